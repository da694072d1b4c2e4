//! Who the client is when proxies stand in front of the gateway. `X-Forwarded-For` and
//! `X-Forwarded-Proto` are believed only from configured trusted proxies; anyone can write
//! them, so from anyone else they are ignored and replaced.

use http::HeaderMap;
use ipnet::IpNet;
use std::borrow::Cow;
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

    /// Whether `ip` is one of the trusted proxies.
    pub fn trusts(&self, ip: &IpAddr) -> bool {
        self.0.iter().any(|n| n.contains(ip))
    }

    /// Resolves the client of a connection from `peer` (over TLS when `tls`), given the
    /// request's headers.
    ///
    /// All `X-Forwarded-For` header lines are joined in order (a proxy may append its own line
    /// rather than extend the client's), then the chain is walked from the right (the hop
    /// nearest to us) while hops are trusted; the first untrusted address is the client.
    /// Anything left of it was written by the client and is dropped. `X-Forwarded-Proto` lines
    /// are joined the same way and the entry written by the proxy nearest the client is used.
    pub fn client(&self, peer: IpAddr, tls: bool, headers: &HeaderMap) -> Client {
        let own_proto = if tls { "https" } else { "http" };
        if !self.trusts(&peer) {
            return Client {
                ip: peer,
                forwarded_for: ip_text(peer),
                proto: own_proto,
            };
        }
        // From the nearest hop outward: each trusted hop vouches for the one before it.
        let xff = joined(headers, "x-forwarded-for");
        let mut chain = Vec::new();
        let mut ip = peer;
        for hop in xff.rsplit(',').map(str::trim) {
            let Ok(hop) = hop.parse::<IpAddr>() else {
                break;
            };
            chain.push(hop);
            ip = hop;
            if !self.trusts(&hop) {
                break;
            }
        }
        let mut forwarded_for: Vec<String> = chain.iter().rev().map(|ip| ip_text(*ip)).collect();
        forwarded_for.push(ip_text(peer));
        // One entry per proxy, the client's first: the one `chain.len()` from the right was
        // written by the trusted proxy the client connected to.
        let xfp = joined(headers, "x-forwarded-proto");
        let protos: Vec<&str> = xfp.split(',').map(str::trim).collect();
        let claimed = protos[protos
            .len()
            .saturating_sub(chain.len())
            .min(protos.len() - 1)];
        let proto = if claimed.eq_ignore_ascii_case("https") {
            "https"
        } else if claimed.eq_ignore_ascii_case("http") {
            "http"
        } else {
            own_proto
        };
        Client {
            ip,
            forwarded_for: forwarded_for.join(", "),
            proto,
        }
    }
}

/// The values of every `name` header line, joined by commas in order (borrowed when there is
/// one line).
fn joined<'a>(headers: &'a HeaderMap, name: &str) -> Cow<'a, str> {
    let mut values = headers.get_all(name).iter().filter_map(|v| v.to_str().ok());
    let Some(first) = values.next() else {
        return Cow::Borrowed("");
    };
    match values.next() {
        None => Cow::Borrowed(first),
        Some(second) => {
            let mut all = format!("{first}, {second}");
            for v in values {
                all.push_str(", ");
                all.push_str(v);
            }
            Cow::Owned(all)
        }
    }
}

/// An address as text. IPv4 is written digit by digit: its `Display` goes through the
/// formatting machinery, a cost on every request.
fn ip_text(ip: IpAddr) -> String {
    let IpAddr::V4(v4) = ip else {
        return ip.to_string();
    };
    let mut text = String::with_capacity(15);
    for (i, octet) in v4.octets().into_iter().enumerate() {
        if i > 0 {
            text.push('.');
        }
        if octet >= 100 {
            text.push(char::from(b'0' + octet / 100));
        }
        if octet >= 10 {
            text.push(char::from(b'0' + octet / 10 % 10));
        }
        text.push(char::from(b'0' + octet % 10));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_written_as_display_writes_them() {
        for a in [
            "0.0.0.0",
            "127.0.0.1",
            "10.20.100.255",
            "192.168.9.90",
            "::1",
            "2001:db8::7",
        ] {
            assert_eq!(ip_text(ip(a)), ip(a).to_string());
        }
    }

    fn trusted() -> TrustedProxies {
        TrustedProxies::new(vec!["10.0.0.0/8".parse().unwrap()])
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn headers(lines: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (name, value) in lines {
            h.append(*name, value.parse().unwrap());
        }
        h
    }

    #[test]
    fn an_untrusted_peer_is_the_client_whatever_it_claims() {
        let h = headers(&[
            ("x-forwarded-for", "1.2.3.4"),
            ("x-forwarded-proto", "http"),
        ]);
        let c = trusted().client(ip("203.0.113.9"), true, &h);
        assert_eq!(c.ip, ip("203.0.113.9"));
        assert_eq!(c.forwarded_for, "203.0.113.9");
        assert_eq!(c.proto, "https");
    }

    #[test]
    fn a_trusted_proxy_vouches_for_the_hop_before_it() {
        let h = headers(&[
            ("x-forwarded-for", "6.6.6.6, 198.51.100.7, 10.0.0.1"),
            ("x-forwarded-proto", "https"),
        ]);
        let c = trusted().client(ip("10.0.0.2"), false, &h);
        // 10.0.0.1 is trusted too, so 198.51.100.7 is the client; 6.6.6.6 came from the
        // client and is not passed on.
        assert_eq!(c.ip, ip("198.51.100.7"));
        assert_eq!(c.forwarded_for, "198.51.100.7, 10.0.0.1, 10.0.0.2");
        assert_eq!(c.proto, "https");
    }

    #[test]
    fn header_lines_a_proxy_appended_are_joined_before_the_walk() {
        // HAProxy's `option forwardfor` adds its own line after the client's.
        let h = headers(&[
            ("x-forwarded-for", "6.6.6.6"),
            ("x-forwarded-for", "198.51.100.7"),
            ("x-forwarded-proto", "http"),
            ("x-forwarded-proto", "https"),
        ]);
        let c = trusted().client(ip("10.0.0.2"), false, &h);
        assert_eq!(c.ip, ip("198.51.100.7"));
        assert_eq!(c.forwarded_for, "198.51.100.7, 10.0.0.2");
        // The client wrote the first proto; the proxy it reached wrote the second.
        assert_eq!(c.proto, "https");
    }

    #[test]
    fn a_trusted_proxy_without_headers_is_the_client() {
        let c = trusted().client(ip("10.0.0.2"), false, &HeaderMap::new());
        assert_eq!(c.ip, ip("10.0.0.2"));
        assert_eq!(c.forwarded_for, "10.0.0.2");
        assert_eq!(c.proto, "http");
    }

    #[test]
    fn garbage_in_the_chain_stops_the_walk() {
        let h = headers(&[("x-forwarded-for", "evil, 198.51.100.7")]);
        assert_eq!(
            trusted().client(ip("10.0.0.2"), false, &h).ip,
            ip("198.51.100.7")
        );
        let h = headers(&[("x-forwarded-for", "198.51.100.7, junk")]);
        assert_eq!(
            trusted().client(ip("10.0.0.2"), false, &h).ip,
            ip("10.0.0.2")
        );
    }
}
