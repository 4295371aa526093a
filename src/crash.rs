//! Crash points for proving crash safety: with `EPHEMERAL_ADMIN_ABORT_AFTER=<step>` in the
//! environment, the process kills itself with SIGKILL right after that step, exactly as a power
//! cut or `kill -9` would. A debugging aid for testing `cleanup`; inert otherwise.
//!
//! Steps: `security-group`, `prepare`, `rule`, `run-instances`, `alarm`,
//! `schedule`, `connecting`, then at the first connection's host-key rotation (`commands::hostkey`)
//! `host-key-made` (the record says rotating) and `host-key-switched` (the box's sshd uses its
//! own key; the record does not know yet).

pub const VARIABLE: &str = "EPHEMERAL_ADMIN_ABORT_AFTER";

pub fn point(step: &str) {
    if std::env::var(VARIABLE).is_ok_and(|wanted| wanted == step) {
        crate::output::Stream::Stderr.line(&format!("{VARIABLE}={step}: killing this process now"));
        // SAFETY: kill(2) on our own pid has no memory-safety preconditions.
        unsafe {
            libc::kill(libc::getpid(), libc::SIGKILL);
        }
    }
}
