//! The signals the agent answers. Installed before the agent changes anything on the host,
//! so no signal it handles can kill it half-way and leave the host changed.

use std::io;

use tokio::signal::unix::{signal, Signal, SignalKind};

/// What a signal asks of the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Asked {
    /// SIGTERM or SIGINT (named): stop in order.
    Stop(&'static str),
    /// SIGHUP (`kill -HUP`, a closed terminal): re-read the config file and apply what
    /// changed, as `lb-agent reload` does.
    Reload,
}

/// SIGTERM and SIGINT stop the agent in order; SIGHUP reloads the config and never kills it.
pub struct Signals {
    term: Signal,
    int: Signal,
    hup: Signal,
}

impl Signals {
    /// Installs the handlers; from now on these signals are queued for `next`.
    pub fn install() -> io::Result<Self> {
        Ok(Self {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
        })
    }

    /// Waits for the next signal.
    pub async fn next(&mut self) -> Asked {
        tokio::select! {
            _ = self.term.recv() => Asked::Stop("SIGTERM"),
            _ = self.int.recv() => Asked::Stop("SIGINT"),
            _ = self.hup.recv() => Asked::Reload,
        }
    }
}
