//! The signals the agent answers. Installed before the agent changes anything on the host,
//! so no signal it handles can kill it half-way and leave the host changed.

use std::io;

use tokio::signal::unix::{signal, Signal, SignalKind};

/// SIGTERM and SIGINT stop the agent in order; SIGHUP (`systemctl reload`, a closed terminal)
/// never kills it.
pub struct Signals {
    term: Signal,
    int: Signal,
    hup: Signal,
}

impl Signals {
    /// Installs the handlers; from now on these signals are queued for `stop_requested`.
    pub fn install() -> io::Result<Self> {
        Ok(Self {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
        })
    }

    /// Waits for SIGTERM or SIGINT and names it. SIGHUP is logged and otherwise ignored
    /// until reloading the config exists.
    pub async fn stop_requested(&mut self) -> &'static str {
        loop {
            tokio::select! {
                _ = self.term.recv() => return "SIGTERM",
                _ = self.int.recv() => return "SIGINT",
                _ = self.hup.recv() => {
                    log::warn!("SIGHUP: ignored (reloading the config is not supported yet; the agent keeps running with the config it has)");
                }
            }
        }
    }
}
