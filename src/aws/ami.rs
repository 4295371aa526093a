//! Which image to boot: an alias resolved through AWS's public SSM parameters (always the
//! current release, no owner/name guessing), or an explicit `ami-` id checked to exist.

use aws_sdk_ec2::types::{ArchitectureValues, Filter};

use super::{Aws, AwsError, AwsResultExt};
use crate::settings::{AmiAlias, AmiChoice, Arch};

/// A bootable image in the session's region.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Image {
    pub id: String,
    /// Where the id came from: the SSM parameter, or "explicit".
    pub source: String,
    /// The root volume's device name, which the block device mapping must name.
    pub root_device_name: String,
}

/// Root device names of the aliased images (fixed by their publishers).
fn alias_root_device(alias: AmiAlias) -> &'static str {
    match alias {
        AmiAlias::Ubuntu2404 => "/dev/sda1",
        AmiAlias::Al2023 => "/dev/xvda",
    }
}

/// The public SSM parameter that names the current image of an alias.
pub fn ssm_parameter(alias: AmiAlias, arch: Arch) -> String {
    match (alias, arch) {
        (AmiAlias::Ubuntu2404, Arch::X86_64) => {
            "/aws/service/canonical/ubuntu/server/24.04/stable/current/amd64/hvm/ebs-gp3/ami-id".into()
        }
        (AmiAlias::Ubuntu2404, Arch::Arm64) => {
            "/aws/service/canonical/ubuntu/server/24.04/stable/current/arm64/hvm/ebs-gp3/ami-id".into()
        }
        (AmiAlias::Al2023, Arch::X86_64) => {
            "/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-x86_64".into()
        }
        (AmiAlias::Al2023, Arch::Arm64) => {
            "/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-arm64".into()
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AmiError {
    /// Not transparent: the AWS error stays a node of the chain, where `exit_codes::report` finds it.
    #[error("{0}")]
    Aws(#[from] AwsError),
    #[error(
        "image {id} does not exist in {region} or is not shared with you: check --ami, or use an alias (ubuntu-24.04, al2023)"
    )]
    NotFound { id: String, region: String },
    #[error(
        "image {id} is built for {found}, but the instance types need {wanted}: pick a matching --ami or --instance-type"
    )]
    WrongArch { id: String, found: String, wanted: String },
    #[error("SSM parameter {0} holds no image id: pass --ami ami-… instead")]
    EmptyParameter(String),
}

/// Resolves the configured image for the architecture of the chosen instance types.
pub async fn resolve(aws: &Aws, choice: &AmiChoice, arch: Arch) -> Result<Image, AmiError> {
    match choice {
        AmiChoice::Alias(alias) => {
            let name = ssm_parameter(*alias, arch);
            let out = aws
                .ssm
                .get_parameter()
                .name(&name)
                .send()
                .await
                .doing(format!("looking up the {} image ({name})", alias.name()))?;
            let id = out.parameter().and_then(|p| p.value()).unwrap_or_default().to_string();
            if !id.starts_with("ami-") {
                return Err(AmiError::EmptyParameter(name));
            }
            Ok(Image { id, source: name, root_device_name: alias_root_device(*alias).into() })
        }
        AmiChoice::Id(id) => {
            let out = aws
                .ec2
                .describe_images()
                .image_ids(id)
                .filters(Filter::builder().name("state").values("available").build())
                .send()
                .await;
            let out = match out {
                Ok(out) => out,
                Err(e) if super::code_of(&e).is_some_and(|c| c.starts_with("InvalidAMIID")) => {
                    return Err(AmiError::NotFound { id: id.clone(), region: aws.region.clone() });
                }
                Err(e) => return Err(AwsError::new(format!("checking image {id}"), e).into()),
            };
            let Some(image) = out.images().first() else {
                return Err(AmiError::NotFound { id: id.clone(), region: aws.region.clone() });
            };
            let wanted = match arch {
                Arch::X86_64 => ArchitectureValues::X8664,
                Arch::Arm64 => ArchitectureValues::Arm64,
            };
            if let Some(found) = image.architecture()
                && *found != wanted
            {
                return Err(AmiError::WrongArch {
                    id: id.clone(),
                    found: found.as_str().into(),
                    wanted: wanted.as_str().into(),
                });
            }
            let root_device_name = image.root_device_name().unwrap_or("/dev/xvda").to_string();
            Ok(Image { id: id.clone(), source: "explicit".into(), root_device_name })
        }
    }
}
