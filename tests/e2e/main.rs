//! End-to-end tests: the real binary against the local cloud (moto behind our fault and latency
//! proxy, the box simulator, real OpenSSH sshd). One test binary keeps link time down.

mod support;

mod access;
mod accounts;
mod boxopts;
mod cleanup;
mod cost;
mod eice;
mod escalation;
mod files;
mod forward;
mod foundation;
mod hostkey;
mod kept;
mod launch;
mod lifecycle;
mod names;
mod networks;
mod owners;
mod policy;
mod realbox;
mod resume;
mod robust;
mod schedule;
mod session;
mod setup;
mod ssh;
