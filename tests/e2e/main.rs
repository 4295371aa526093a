//! End-to-end tests: the real binary against the local cloud (moto behind our fault and latency
//! proxy, the box simulator, real OpenSSH sshd). One test binary keeps link time down.

mod support;

mod access;
mod accounts;
mod boxopts;
mod cleanup;
mod cost;
mod files;
mod foundation;
mod kept;
mod launch;
mod lifecycle;
mod names;
mod policy;
mod realbox;
mod robust;
mod session;
mod ssh;
