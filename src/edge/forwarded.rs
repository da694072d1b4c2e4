//! Who the client is when proxies stand in front of the gateway. `X-Forwarded-For` and
//! `X-Forwarded-Proto` are believed only from configured trusted proxies; anyone can write
//! them, so from anyone else they are ignored and replaced.

use ipnet::IpNet;
use std::net::IpAddr;

/// The client as far as trusted proxies vouch for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Client {
    /// The address requests are attributed to (rate limits, access log).
    pub ip: IpAddr,
    /// `X-Forwarded-For` to send on: the trusted chain, then the connecting peer.
    pub forwarded_for: String,
    /// `http` or `https` as the client used it.
    pub proto: &'static str,
}

/// The proxies whose forwarding headers are believed.
#[derive(Debug, Clone, Default)]
pub struct TrustedProxies(Vec<IpNet>);

impl TrustedProxies {
    pub fn new(nets: Vec<IpNet>) -> Self {
        TrustedProxies(nets)
    }

    fn trusts(&self, ip: &IpAddr) -> bool {
        self.0.iter().any(|n| n.contains(ip))
    }

    /// Resolves the client of a connection from `peer` (over TLS when `tls`), given the
    /// request's `X-Forwarded-For` and `X-Forwarded-Proto` values.
    ///
    /// The chain is walked from the right (the hop nearest to us) while hops are trusted; the
    /// first untrusted address is the client. Anything left of it was written by the client
    /// and is dropped.
    pub fn client(&self, peer: IpAddr, tls: bool, xff: Option<&str>, xfp: Option<&str>) -> Client {
        let own_proto = if tls { "https" } else { "http" };
        if !self.trusts(&peer) {
            return Client {
                ip: peer,
                forwarded_for: peer.to_string(),
                proto: own_proto,
            };
        }
        // From the nearest hop outward: each trusted hop vouches for the one before it.
        let mut chain = Vec::new();
        let mut ip = peer;
        for hop in xff.unwrap_or("").rsplit(',').map(str::trim) {
            let Ok(hop) = hop.parse::<IpAddr>() else {
                break;
            };
            chain.push(hop);
            ip = hop;
            if !self.trusts(&hop) {
                break;
            }
        }
        let mut forwarded_for: Vec<String> = chain.iter().rev().map(IpAddr::to_string).collect();
        forwarded_for.push(peer.to_string());
        let proto = match xfp.map(str::trim) {
            Some(p) if p.eq_ignore_ascii_case("https") => "https",
            Some(p) if p.eq_ignore_ascii_case("http") => "http",
            _ => own_proto,
        };
        Client {
            ip,
            forwarded_for: forwarded_for.join(", "),
            proto,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trusted() -> TrustedProxies {
        TrustedProxies::new(vec!["10.0.0.0/8".parse().unwrap()])
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn an_untrusted_peer_is_the_client_whatever_it_claims() {
        let c = trusted().client(ip("203.0.113.9"), true, Some("1.2.3.4"), Some("http"));
        assert_eq!(c.ip, ip("203.0.113.9"));
        assert_eq!(c.forwarded_for, "203.0.113.9");
        assert_eq!(c.proto, "https");
    }

    #[test]
    fn a_trusted_proxy_vouches_for_the_hop_before_it() {
        let c = trusted().client(
            ip("10.0.0.2"),
            false,
            Some("6.6.6.6, 198.51.100.7, 10.0.0.1"),
            Some("https"),
        );
        // 10.0.0.1 is trusted too, so 198.51.100.7 is the client; 6.6.6.6 came from the
        // client and is not passed on.
        assert_eq!(c.ip, ip("198.51.100.7"));
        assert_eq!(c.forwarded_for, "198.51.100.7, 10.0.0.1, 10.0.0.2");
        assert_eq!(c.proto, "https");
    }

    #[test]
    fn a_trusted_proxy_without_headers_is_the_client() {
        let c = trusted().client(ip("10.0.0.2"), false, None, None);
        assert_eq!(c.ip, ip("10.0.0.2"));
        assert_eq!(c.forwarded_for, "10.0.0.2");
        assert_eq!(c.proto, "http");
    }

    #[test]
    fn garbage_in_the_chain_stops_the_walk() {
        let c = trusted().client(ip("10.0.0.2"), false, Some("evil, 198.51.100.7"), None);
        assert_eq!(c.ip, ip("198.51.100.7"));
        let c = trusted().client(ip("10.0.0.2"), false, Some("198.51.100.7, junk"), None);
        assert_eq!(c.ip, ip("10.0.0.2"));
    }
}
