//! Where the backend is: `host:port`, where host is an IP literal or a DNS name
//! (a Kubernetes Service name, say) resolved again on every connect, so a
//! changed record is followed without a restart.

use std::fmt;
use std::io;
use std::str::FromStr;

use tokio::net::TcpStream;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendAddress {
    host: String,
    port: u16,
}

impl BackendAddress {
    /// The host part: an IP literal or a DNS name.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// Opens a TCP connection, resolving the host name if it is one.
    pub async fn connect(&self) -> io::Result<TcpStream> {
        TcpStream::connect((self.host.as_str(), self.port)).await
    }
}

impl FromStr for BackendAddress {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let invalid =
            || format!("`{text}` is not host:port, such as 127.0.0.1:7480 or s3gw.s3gw.svc:80");
        let (host, port) = text.rsplit_once(':').ok_or_else(invalid)?;
        let port: u16 = port.parse().map_err(|_| invalid())?;
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        let valid_name = host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '_'));
        if host.is_empty() || port == 0 || !valid_name {
            return Err(invalid());
        }
        Ok(BackendAddress {
            host: host.to_owned(),
            port,
        })
    }
}

impl fmt::Display for BackendAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

impl From<std::net::SocketAddr> for BackendAddress {
    fn from(address: std::net::SocketAddr) -> Self {
        BackendAddress {
            host: address.ip().to_string(),
            port: address.port(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ip_literals_and_names_parse() {
        let v4: BackendAddress = "127.0.0.1:7480".parse().unwrap();
        assert_eq!(v4.to_string(), "127.0.0.1:7480");
        let v6: BackendAddress = "[::1]:7480".parse().unwrap();
        assert_eq!(v6.to_string(), "[::1]:7480");
        let name: BackendAddress = "s3gw-s3gw.s3gw.svc.cluster.local:80".parse().unwrap();
        assert_eq!(name.to_string(), "s3gw-s3gw.s3gw.svc.cluster.local:80");
    }

    #[test]
    fn malformed_addresses_are_refused() {
        for bad in ["s3gw", "s3gw:http", ":80", "host:0", "a b:80", "host:99999"] {
            assert!(bad.parse::<BackendAddress>().is_err(), "{bad}");
        }
    }
}
