//! Where requests and probes go now: the one owner of the backend's address
//! and of how to connect to it (a [`Connector`]). The upstream pool and the
//! probe both read it at each connect, so they never disagree; discovery
//! moves it to a new pod, and a reload changes how to connect.
//!
//! Who decides the address is settled here too: with `[backend.kubernetes]`
//! discovery owns it (a reload keeps the running address and only takes the
//! new TLS settings); without, the config file does.

use std::sync::{Arc, RwLock};

use crate::backend_address::BackendAddress;
use crate::connector::Connector;

/// The backend the proxy sends to and probes. Shared as `Arc<BackendTarget>`.
#[derive(Debug)]
pub struct BackendTarget {
    connector: RwLock<Arc<Connector>>,
    /// Discovery owns the address: a reload must not move it.
    discovered: bool,
}

impl BackendTarget {
    /// A target reached through `connector`; `discovered` when discovery,
    /// not the config file, owns the address.
    pub fn new(connector: Connector, discovered: bool) -> Arc<BackendTarget> {
        Arc::new(BackendTarget {
            connector: RwLock::new(Arc::new(connector)),
            discovered,
        })
    }

    /// How to reach the backend now.
    pub fn connector(&self) -> Arc<Connector> {
        Arc::clone(&self.connector.read().unwrap())
    }

    /// Discovery found the backend at `address`: the same TLS settings,
    /// towards it.
    pub fn move_to(&self, address: BackendAddress) {
        let moved = self.connector().retarget(address);
        self.replace(moved);
    }

    /// A reloaded configuration's connector: taken as it is, or, while
    /// discovery owns the address, only its TLS settings.
    pub fn reconfigure(&self, connector: Connector) {
        let connector = match self.discovered {
            true => connector.retarget(self.connector().address().clone()),
            false => connector,
        };
        self.replace(connector);
    }

    fn replace(&self, connector: Connector) {
        let mut current = self.connector.write().unwrap();
        // An equal connector keeps the pool's idle connections usable.
        if **current != connector {
            *current = Arc::new(connector);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plain(address: &str) -> Connector {
        Connector::plain(address.parse().unwrap())
    }

    #[test]
    fn discovery_moves_the_target() {
        let target = BackendTarget::new(plain("10.0.0.1:7480"), true);
        target.move_to("10.0.0.2:7480".parse().unwrap());
        assert_eq!(target.connector().address().to_string(), "10.0.0.2:7480");
    }

    #[test]
    fn a_reload_keeps_the_discovered_address() {
        let target = BackendTarget::new(plain("10.0.0.1:7480"), true);
        target.move_to("10.0.0.2:7480".parse().unwrap());
        target.reconfigure(plain("127.0.0.1:7480"));
        assert_eq!(target.connector().address().to_string(), "10.0.0.2:7480");
    }

    #[test]
    fn without_discovery_a_reload_moves_the_target() {
        let target = BackendTarget::new(plain("10.0.0.1:7480"), false);
        target.reconfigure(plain("10.0.0.3:7480"));
        assert_eq!(target.connector().address().to_string(), "10.0.0.3:7480");
    }

    #[test]
    fn an_unchanged_reload_keeps_the_same_connector() {
        let target = BackendTarget::new(plain("10.0.0.1:7480"), false);
        let before = target.connector();
        target.reconfigure(plain("10.0.0.1:7480"));
        assert!(Arc::ptr_eq(&before, &target.connector()));
    }
}
