//! Discovery as a pure index: what the Service's EndpointSlices say about the
//! backend, and which address the proxy should use.
//!
//! [`EndpointIndex`] unions every slice of the Service (`apply`, `delete`, and
//! `reset` for an atomic relist), dedupes endpoints by address, and tells
//! usable endpoints (`serving && !terminating`; `serving` unset defers to
//! `ready`, as the API documents) from terminating ones. [`choose`] turns that
//! view and the address in use into a [`Choice`]. No I/O: the Kubernetes watch
//! in `kubernetes.rs` feeds it and acts on its answers.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use k8s_openapi::api::discovery::v1::EndpointSlice;

/// Which port of the slices is the backend's: by name (`s3`) or number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PortSelector {
    Name(String),
    Number(u16),
}

impl PortSelector {
    pub fn parse(text: &str) -> PortSelector {
        match text.parse::<u16>() {
            Ok(number) => PortSelector::Number(number),
            Err(_) => PortSelector::Name(text.to_owned()),
        }
    }

    /// The endpoint port this selector picks in `slice`, if it has one.
    fn port_in(&self, slice: &EndpointSlice) -> Option<u16> {
        let ports = slice.ports.as_deref().unwrap_or_default();
        match self {
            PortSelector::Number(number) => Some(*number),
            PortSelector::Name(name) => ports
                .iter()
                .find(|p| p.name.as_deref() == Some(name.as_str()))
                .and_then(|p| p.port)
                .and_then(|p| u16::try_from(p).ok()),
        }
    }
}

/// One endpoint address as a slice describes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Seen {
    address: SocketAddr,
    usable: bool,
    terminating: bool,
}

/// The union of a Service's EndpointSlices.
#[derive(Debug, Default, Clone)]
pub struct EndpointIndex {
    slices: BTreeMap<String, Vec<Seen>>,
}

/// What the index says now.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Endpoints {
    /// Serving and not terminating, sorted, deduplicated.
    pub usable: Vec<SocketAddr>,
    /// Terminating (and not usable through another slice).
    pub terminating: Vec<SocketAddr>,
}

impl EndpointIndex {
    /// Adds or replaces one slice.
    pub fn apply(&mut self, slice: &EndpointSlice, port: &PortSelector) {
        let name = slice.metadata.name.clone().unwrap_or_default();
        self.slices.insert(name, seen_in(slice, port));
    }

    pub fn delete(&mut self, slice: &EndpointSlice) {
        let name = slice.metadata.name.clone().unwrap_or_default();
        self.slices.remove(&name);
    }

    /// Replaces everything with a complete list (a relist is atomic).
    pub fn reset<'a>(
        &mut self,
        slices: impl IntoIterator<Item = &'a EndpointSlice>,
        port: &PortSelector,
    ) {
        self.slices.clear();
        for slice in slices {
            self.apply(slice, port);
        }
    }

    pub fn endpoints(&self) -> Endpoints {
        let mut usable: Vec<SocketAddr> = Vec::new();
        let mut terminating: Vec<SocketAddr> = Vec::new();
        for seen in self.slices.values().flatten() {
            if seen.usable {
                usable.push(seen.address);
            } else if seen.terminating {
                terminating.push(seen.address);
            }
        }
        usable.sort();
        usable.dedup();
        terminating.sort();
        terminating.dedup();
        terminating.retain(|address| !usable.contains(address));
        Endpoints {
            usable,
            terminating,
        }
    }
}

fn seen_in(slice: &EndpointSlice, port: &PortSelector) -> Vec<Seen> {
    let Some(port) = port.port_in(slice) else {
        return Vec::new();
    };
    let mut seen = Vec::new();
    for endpoint in slice.endpoints.iter().flatten() {
        let conditions = endpoint.conditions.clone().unwrap_or_default();
        let ready = conditions.ready.unwrap_or(true);
        let serving = conditions.serving.unwrap_or(ready);
        let terminating = conditions.terminating.unwrap_or(false);
        for address in &endpoint.addresses {
            if let Ok(ip) = address.parse::<IpAddr>() {
                seen.push(Seen {
                    address: SocketAddr::new(ip, port),
                    usable: serving && !terminating,
                    terminating,
                });
            }
        }
    }
    seen
}

/// What to do with the backend address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Choice {
    /// The address in use is usable: keep it.
    Keep(SocketAddr),
    /// Move to this usable address (trust it once the probe sees it serve).
    SwitchTo(SocketAddr),
    /// No usable endpoint: hold new requests. `terminating` says the address
    /// in use is being shut down on purpose (a planned switch-over).
    Hold { terminating: bool },
}

/// Decides from the endpoints and the address in use.
pub fn choose(current: Option<SocketAddr>, endpoints: &Endpoints) -> Choice {
    if let Some(current) = current
        && endpoints.usable.contains(&current)
    {
        return Choice::Keep(current);
    }
    if let Some(first) = endpoints.usable.first() {
        return Choice::SwitchTo(*first);
    }
    Choice::Hold {
        terminating: current.is_some_and(|c| endpoints.terminating.contains(&c)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort};

    /// An endpoint's address with its ready, serving and terminating conditions.
    type Row<'a> = (&'a str, Option<bool>, Option<bool>, Option<bool>);

    fn slice(name: &str, endpoints: &[Row<'_>]) -> EndpointSlice {
        let mut slice = EndpointSlice {
            address_type: "IPv4".into(),
            endpoints: Some(
                endpoints
                    .iter()
                    .map(|(address, ready, serving, terminating)| Endpoint {
                        addresses: vec![address.to_string()],
                        conditions: Some(EndpointConditions {
                            ready: *ready,
                            serving: *serving,
                            terminating: *terminating,
                        }),
                        ..Default::default()
                    })
                    .collect(),
            ),
            ports: Some(vec![EndpointPort {
                name: Some("s3".into()),
                port: Some(7480),
                ..Default::default()
            }]),
            ..Default::default()
        };
        slice.metadata.name = Some(name.into());
        slice
    }

    fn addr(text: &str) -> SocketAddr {
        format!("{text}:7480").parse().unwrap()
    }

    fn index(slices: &[EndpointSlice]) -> Endpoints {
        let mut index = EndpointIndex::default();
        index.reset(slices, &PortSelector::parse("s3"));
        index.endpoints()
    }

    #[test]
    fn serving_and_not_terminating_is_usable() {
        let view = index(&[slice(
            "a",
            &[
                ("127.0.0.2", Some(true), Some(true), Some(false)),
                ("127.0.0.3", Some(true), Some(true), Some(true)),
                ("127.0.0.4", Some(false), Some(false), Some(false)),
            ],
        )]);
        assert_eq!(view.usable, [addr("127.0.0.2")]);
        assert_eq!(view.terminating, [addr("127.0.0.3")]);
    }

    #[test]
    fn ready_alone_is_not_trusted_when_serving_says_otherwise() {
        // With publishNotReadyAddresses ready is always true.
        let view = index(&[slice(
            "a",
            &[("127.0.0.2", Some(true), Some(false), Some(true))],
        )]);
        assert!(view.usable.is_empty());
    }

    #[test]
    fn serving_unset_defers_to_ready() {
        let view = index(&[slice("a", &[("127.0.0.2", Some(true), None, None)])]);
        assert_eq!(view.usable, [addr("127.0.0.2")]);
    }

    #[test]
    fn slices_are_unioned_and_addresses_deduplicated() {
        let view = index(&[
            slice("a", &[("127.0.0.2", Some(true), Some(true), Some(false))]),
            slice("b", &[("127.0.0.2", Some(true), Some(true), Some(false))]),
        ]);
        assert_eq!(view.usable, [addr("127.0.0.2")]);
    }

    #[test]
    fn a_deleted_slice_takes_its_endpoints_along() {
        let mut index = EndpointIndex::default();
        let port = PortSelector::parse("s3");
        let a = slice("a", &[("127.0.0.2", Some(true), Some(true), None)]);
        index.apply(&a, &port);
        index.delete(&a);
        assert!(index.endpoints().usable.is_empty());
    }

    #[test]
    fn a_port_by_number_is_used_as_given() {
        let mut index = EndpointIndex::default();
        index.apply(
            &slice("a", &[("127.0.0.2", None, None, None)]),
            &PortSelector::parse("9000"),
        );
        assert_eq!(
            index.endpoints().usable,
            ["127.0.0.2:9000".parse::<SocketAddr>().unwrap()]
        );
    }

    #[test]
    fn choices_follow_the_endpoints() {
        let (old, new) = (addr("127.0.0.2"), addr("127.0.0.3"));
        let both = Endpoints {
            usable: vec![old, new],
            terminating: vec![],
        };
        assert_eq!(choose(Some(old), &both), Choice::Keep(old));
        let only_new = Endpoints {
            usable: vec![new],
            terminating: vec![old],
        };
        assert_eq!(choose(Some(old), &only_new), Choice::SwitchTo(new));
        let draining = Endpoints {
            usable: vec![],
            terminating: vec![old],
        };
        assert_eq!(
            choose(Some(old), &draining),
            Choice::Hold { terminating: true }
        );
        assert_eq!(
            choose(None, &Endpoints::default()),
            Choice::Hold { terminating: false }
        );
    }
}
