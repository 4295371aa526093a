//! Test support shared by every end-to-end test: the local cloud (moto, the fault and latency
//! proxy, the box simulator), a private CLI user, and the control API client.

pub mod cli;
pub mod cloud;
pub mod http;
pub mod sshd;

pub use cli::User;
pub use cloud::LocalCloud;
