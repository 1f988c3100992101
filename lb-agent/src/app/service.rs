//! Talking to the service manager: systemd's notification protocol (`sd_notify(3)`), as
//! `packaging/systemd/lb-agent.service` (`Type=notify`) expects it.
//!
//! Every function here is a no-op when `NOTIFY_SOCKET` is unset (the agent was not started
//! by a service manager that listens) and never fails the agent: a notification that cannot
//! be sent is logged once as a warning, later ones at debug level. `NOTIFY_SOCKET` stays
//! set after `READY=1` (an agent that re-executes itself notifies again); only the agent's
//! main process may notify (`NotifyAccess=main`), so notify scripts that inherit it cannot
//! speak for the agent.
//!
//! The datagram is sent with a blocking send on whichever thread calls: systemd drains its
//! notification socket at once, so this returns immediately in practice.

use std::sync::atomic::{AtomicBool, Ordering};

use sd_notify::NotifyState;

/// The environment variable naming the service manager's socket.
const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";

/// Set once a notification failed and the warning was logged.
static WARNED: AtomicBool = AtomicBool::new(false);

/// `READY=1`: the agent serves (XDP attached, control socket bound, tasks and VRRP
/// started). `status` becomes the unit's `STATUS=` line (`systemctl status lb-agent`).
/// Also the end of a reload begun with [`reloading`].
pub fn ready(status: &str) {
    let status = one_line(status);
    send(
        "READY=1",
        &[NotifyState::Ready, NotifyState::Status(&status)],
    );
}

/// `RELOADING=1` with `MONOTONIC_USEC=` (systemd 253 and later want both for
/// `Type=notify-reload`; older ones ignore the second): the agent re-reads its config. Send
/// [`ready`] when done, whether the new config was taken or refused, or systemd keeps the
/// unit in "reloading" until its timeout.
pub fn reloading() {
    let mut states = vec![NotifyState::Reloading];
    match NotifyState::monotonic_usec_now() {
        Ok(now) => states.push(now),
        Err(e) => log::debug!("reading CLOCK_MONOTONIC for MONOTONIC_USEC: {e}"),
    }
    send("RELOADING=1", &states);
}

/// `STOPPING=1`: the agent has begun to shut down (gives up the VIP, detaches). `status`
/// says why.
pub fn stopping(status: &str) {
    let status = one_line(status);
    send(
        "STOPPING=1",
        &[NotifyState::Stopping, NotifyState::Status(&status)],
    );
}

/// `STATUS=`: a one-line description of what the agent is doing.
pub fn status(status: &str) {
    let status = one_line(status);
    send("STATUS=", &[NotifyState::Status(&status)]);
}

/// `STATUS=` ends at a newline (the next line would be read as another assignment).
fn one_line(s: &str) -> String {
    s.replace(['\n', '\r'], " ")
}

fn send(what: &str, states: &[NotifyState]) {
    if std::env::var_os(NOTIFY_SOCKET).is_none() {
        return;
    }
    if let Err(e) = sd_notify::notify(states) {
        let socket = std::env::var_os(NOTIFY_SOCKET).unwrap_or_default();
        if WARNED.swap(true, Ordering::Relaxed) {
            log::debug!(
                "telling the service manager {what} through {}: {e}",
                socket.to_string_lossy()
            );
        } else {
            log::warn!(
                "telling the service manager {what} through NOTIFY_SOCKET={}: {e} (the agent carries on; later failures are logged at debug level)",
                socket.to_string_lossy()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_is_one_line() {
        assert_eq!(one_line("a\nb\r\nc"), "a b  c");
        assert_eq!(one_line("serving"), "serving");
    }
}
