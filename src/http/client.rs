//! Which client a request comes from, for the failure throttles
//! ([`crate::auth::throttle`]).
//!
//! The peer address of the connection (put on each request by
//! [`super::conn::serve_connection`]) is the client, unless that peer is a
//! configured trusted proxy (`TRUSTED_PROXIES`): then `X-Forwarded-For` is
//! read from its right end, skipping the trusted proxies, and the first
//! address that is not one is the client. Anything left of it was written
//! by the client itself and is never believed.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use axum::extract::ConnectInfo;
use axum::http::request::Parts;

/// The address a request is throttled under. An IPv6 client is counted by
/// its /64, the smallest block a host is usually given, so an attacker
/// cannot step through the addresses of its own network to start afresh.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ClientAddr(pub IpAddr);

impl ClientAddr {
    pub fn of(parts: &Parts, trusted: &[ipnet::IpNet]) -> Option<ClientAddr> {
        let peer = parts.extensions.get::<ConnectInfo<SocketAddr>>()?.0.ip();
        Some(ClientAddr::bucket(resolve(peer, parts, trusted)))
    }

    fn bucket(ip: IpAddr) -> ClientAddr {
        match ip {
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => ClientAddr(IpAddr::V4(v4)),
                None => {
                    let s = v6.segments();
                    ClientAddr(IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0)))
                }
            },
            v4 => ClientAddr(v4),
        }
    }
}

impl std::fmt::Display for ClientAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            IpAddr::V6(v6) => write!(f, "{v6}/64"),
            v4 => write!(f, "{v4}"),
        }
    }
}

fn is_trusted(ip: IpAddr, trusted: &[ipnet::IpNet]) -> bool {
    trusted.iter().any(|net| net.contains(&ip))
}

fn resolve(peer: IpAddr, parts: &Parts, trusted: &[ipnet::IpNet]) -> IpAddr {
    if !is_trusted(peer, trusted) {
        return peer;
    }
    // Every X-Forwarded-For header, in order, as one list; read from the right.
    let hops: Vec<&str> = parts
        .headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .collect();
    let mut client = peer;
    for hop in hops.iter().rev() {
        match hop.parse::<IpAddr>() {
            Ok(ip) => {
                client = ip;
                if !is_trusted(ip, trusted) {
                    break;
                }
            }
            // A hop that is no address: the chain is broken here; the last
            // trusted hop is the client as far as we can tell.
            Err(_) => break,
        }
    }
    client
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::Request;

    fn parts(peer: &str, xff: &[&str]) -> Parts {
        let mut req = Request::builder();
        for v in xff {
            req = req.header("x-forwarded-for", *v);
        }
        let (mut parts, _) = req.body(()).unwrap().into_parts();
        parts.extensions.insert(ConnectInfo(peer.parse::<SocketAddr>().unwrap()));
        parts
    }

    fn nets(list: &[&str]) -> Vec<ipnet::IpNet> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn forwarded_for_is_believed_only_from_a_trusted_proxy() {
        let ip = |s: &str| ClientAddr(s.parse().unwrap());
        // No trusted proxy: the header is the client's own claim.
        assert_eq!(ClientAddr::of(&parts("10.0.0.1:5000", &["1.2.3.4"]), &[]), Some(ip("10.0.0.1")));
        let trusted = nets(&["10.0.0.0/8"]);
        assert_eq!(ClientAddr::of(&parts("10.0.0.1:5000", &["1.2.3.4"]), &trusted), Some(ip("1.2.3.4")));
        // A forged left part is skipped: the rightmost untrusted hop counts.
        assert_eq!(
            ClientAddr::of(&parts("10.0.0.1:5000", &["6.6.6.6, 1.2.3.4", "10.0.0.9"]), &trusted),
            Some(ip("1.2.3.4"))
        );
        // From an untrusted peer the header is ignored.
        assert_eq!(ClientAddr::of(&parts("8.8.8.8:5000", &["1.2.3.4"]), &trusted), Some(ip("8.8.8.8")));
        // Garbage in the chain stops the walk at the last trusted hop.
        assert_eq!(ClientAddr::of(&parts("10.0.0.1:5000", &["junk"]), &trusted), Some(ip("10.0.0.1")));
        // IPv6 by /64; a v4-mapped peer is its v4 address.
        assert_eq!(ClientAddr::of(&parts("[2001:db8:1:2:3:4:5:6]:80", &[]), &[]), Some(ip("2001:db8:1:2::")));
        assert_eq!(ClientAddr::of(&parts("[::ffff:1.2.3.4]:80", &[]), &[]), Some(ip("1.2.3.4")));
        // No peer known (a request built in-process): none.
        let (bare, _) = Request::builder().body(()).unwrap().into_parts();
        assert_eq!(ClientAddr::of(&bare, &[]), None);
    }
}
