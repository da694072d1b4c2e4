//! Backend addresses as operators write them: `host:port` or `http(s)://host[:port][/base]`.

use std::fmt;

/// How the gateway talks to a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    Http,
    Https,
}

/// A parsed backend address. Host names are resolved later, off the request path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendAddr {
    pub scheme: Scheme,
    /// Host name or IP literal (without IPv6 brackets).
    pub host: String,
    pub port: u16,
    /// Path prefix of the OpenAI API on that backend, without a trailing slash (`/v1`).
    pub base_path: String,
}

impl BackendAddr {
    /// Parses `host:port` (TLS when `tls` is true) or a URL whose scheme says it.
    pub fn parse(text: &str, tls: bool) -> Result<BackendAddr, String> {
        let text = text.trim();
        let has_scheme = text.contains("://");
        let url = if has_scheme {
            text.to_string()
        } else {
            format!("{}://{text}", if tls { "https" } else { "http" })
        };
        let uri: http::Uri = url
            .parse()
            .map_err(|e| format!("{text:?} is not a valid host:port or URL ({e})"))?;
        let scheme = match uri.scheme_str() {
            Some("http") => Scheme::Http,
            Some("https") => Scheme::Https,
            other => {
                return Err(format!(
                    "{text:?}: scheme {:?} is not supported; use http:// or https://",
                    other.unwrap_or("")
                ))
            }
        };
        let host = uri
            .host()
            .filter(|h| !h.is_empty())
            .ok_or_else(|| format!("{text:?} has no host"))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let port = match uri.port_u16() {
            Some(0) => return Err(format!("{text:?}: port 0 is not a valid port")),
            Some(p) => p,
            None if !has_scheme => {
                return Err(format!(
                    "{text:?} has no port; write host:port or a URL such as http://{text}"
                ))
            }
            None if scheme == Scheme::Https => 443,
            None => 80,
        };
        if uri.query().is_some() {
            return Err(format!(
                "{text:?}: a backend URL cannot have a query string"
            ));
        }
        let path = uri.path().trim_end_matches('/');
        let base_path = if has_scheme && !path.is_empty() {
            path.to_string()
        } else {
            "/v1".to_string()
        };
        Ok(BackendAddr {
            scheme,
            host,
            port,
            base_path,
        })
    }

    pub fn tls(&self) -> bool {
        self.scheme == Scheme::Https
    }

    /// `host:port` as it goes in a Host header (IPv6 literals bracketed).
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

impl fmt::Display for BackendAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.tls() { "https" } else { "http" };
        write!(f, "{scheme}://{}{}", self.authority(), self.base_path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_port_defaults_to_v1() {
        let b = BackendAddr::parse("127.0.0.1:8001", false).unwrap();
        assert_eq!(b.to_string(), "http://127.0.0.1:8001/v1");
        assert!(BackendAddr::parse("node1:8001", true).unwrap().tls());
    }

    #[test]
    fn urls_keep_their_base_path_and_default_port() {
        let b = BackendAddr::parse("https://metis.example.org/api/v1/", false).unwrap();
        assert_eq!(
            (b.host.as_str(), b.port, b.base_path.as_str(), b.tls()),
            ("metis.example.org", 443, "/api/v1", true)
        );
        let b = BackendAddr::parse("http://[::1]:9000", false).unwrap();
        assert_eq!(b.authority(), "[::1]:9000");
    }

    #[test]
    fn mistakes_are_explained() {
        assert!(BackendAddr::parse("node1", false)
            .unwrap_err()
            .contains("no port"));
        assert!(BackendAddr::parse("ftp://x:1", false)
            .unwrap_err()
            .contains("scheme"));
        assert!(BackendAddr::parse("h:99999", false).is_err());
        assert!(BackendAddr::parse("h:0", false)
            .unwrap_err()
            .contains("port 0"));
    }
}
