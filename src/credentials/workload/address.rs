//! Workload API addresses, validated as the SPIFFE Workload Endpoint standard (section 4) says:
//! `unix:///abs/path` or `unix:/abs/path` (no authority), or `tcp://IP:PORT` (an IP address, not
//! a name, and a port); no query, fragment or userinfo anywhere.

use std::ffi::OsString;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::ffi::OsStringExt;
use std::path::PathBuf;
use std::str::FromStr;

use crate::error::Error;

/// The environment variable a workload reads the Workload API address from.
pub const ENDPOINT_SOCKET_ENV: &str = "SPIFFE_ENDPOINT_SOCKET";

/// Where the Workload API (a SPIRE agent, usually) listens.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum WorkloadApiAddress {
    /// A Unix domain socket, by absolute path.
    Unix(PathBuf),
    /// A TCP socket, by IP address and port.
    Tcp(SocketAddr),
}

impl WorkloadApiAddress {
    /// Parses `unix:///path`, `unix:/path` or `tcp://IP:PORT`, or `env` meaning the value of
    /// `SPIFFE_ENDPOINT_SOCKET` (same syntax).
    pub fn parse(s: &str) -> Result<Self, Error> {
        if s == "env" {
            return Self::from_env();
        }
        parse_uri(s).map_err(|why| Error::config(format!("Workload API address '{s}': {why}")))
    }

    /// Reads the address from `SPIFFE_ENDPOINT_SOCKET`.
    pub fn from_env() -> Result<Self, Error> {
        Self::from_env_value(std::env::var_os(ENDPOINT_SOCKET_ENV))
    }

    fn from_env_value(value: Option<OsString>) -> Result<Self, Error> {
        let value = match value {
            Some(v) if !v.is_empty() => v,
            _ => {
                return Err(Error::config(format!(
                    "the Workload API address is taken from {ENDPOINT_SOCKET_ENV}, which is not set \
                     (set it, e.g. to unix:///run/spire/sockets/agent.sock, or give the address)"
                )))
            }
        };
        let value =
            value.into_string().map_err(|v| Error::config(format!("{ENDPOINT_SOCKET_ENV}={v:?}: not valid UTF-8")))?;
        parse_uri(&value).map_err(|why| Error::config(format!("{ENDPOINT_SOCKET_ENV}='{value}': {why}")))
    }
}

impl FromStr for WorkloadApiAddress {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        Self::parse(s)
    }
}

impl fmt::Display for WorkloadApiAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WorkloadApiAddress::Unix(p) => write!(f, "unix://{}", p.display()),
            WorkloadApiAddress::Tcp(a) => write!(f, "tcp://{a}"),
        }
    }
}

fn parse_uri(s: &str) -> Result<WorkloadApiAddress, String> {
    let Some((scheme, rest)) = s.split_once(':') else {
        return Err("not a URI: write unix:///path/to/agent.sock or tcp://IP:PORT".into());
    };
    if rest.contains('?') {
        return Err("a query ('?') is not allowed".into());
    }
    if rest.contains('#') {
        return Err("a fragment ('#') is not allowed".into());
    }
    // URI schemes are case-insensitive (RFC 3986, 3.1).
    match scheme.to_ascii_lowercase().as_str() {
        "unix" => parse_unix(rest),
        "tcp" => parse_tcp(rest),
        other => Err(format!("scheme '{other}' is not supported: use unix or tcp")),
    }
}

fn parse_unix(rest: &str) -> Result<WorkloadApiAddress, String> {
    // `unix:///p` has an empty authority, `unix:/p` none; `unix://host/p` names a host.
    let path = match rest.strip_prefix("//") {
        Some(after) => {
            let (authority, path) = after.split_at(after.find('/').unwrap_or(after.len()));
            if !authority.is_empty() {
                return Err(format!(
                    "a unix address has no authority, but '{authority}' is given (three slashes: unix:///path)"
                ));
            }
            path
        }
        None => rest,
    };
    if path.is_empty() {
        return Err("the socket path is missing".into());
    }
    if !path.starts_with('/') {
        return Err(format!("the socket path '{path}' must be absolute"));
    }
    let bytes = percent_decode(path)?;
    if bytes.contains(&0) {
        return Err("the socket path holds a NUL byte".into());
    }
    Ok(WorkloadApiAddress::Unix(PathBuf::from(OsString::from_vec(bytes))))
}

fn parse_tcp(rest: &str) -> Result<WorkloadApiAddress, String> {
    let Some(after) = rest.strip_prefix("//") else {
        return Err(format!("write tcp://{rest}: the IP and port form the URI's authority"));
    };
    let (authority, path) = after.split_at(after.find('/').unwrap_or(after.len()));
    if !path.is_empty() {
        return Err(format!("a tcp address has no path, but '{path}' is given"));
    }
    if authority.contains('@') {
        return Err("userinfo ('…@') is not allowed".into());
    }
    if authority.is_empty() {
        return Err("the IP address and port are missing".into());
    }
    let (host, port, bracketed) = if let Some(v6) = authority.strip_prefix('[') {
        let Some((ip, after)) = v6.split_once(']') else {
            return Err(format!("'{authority}': the '[' of an IPv6 address is not closed"));
        };
        let Some(port) = after.strip_prefix(':') else {
            return Err(format!("the port is missing: tcp://[{ip}]:PORT"));
        };
        (ip, port, true)
    } else {
        match authority.rsplit_once(':') {
            Some((h, _)) if h.contains(':') => {
                return Err(format!("write an IPv6 address in brackets: tcp://[{h}]:PORT"));
            }
            Some((h, p)) => (h, p, false),
            None => return Err(format!("the port is missing: tcp://{authority}:PORT")),
        }
    };
    let ip: IpAddr =
        host.parse().map_err(|_| format!("'{host}' is not an IP address (the standard allows no host names here)"))?;
    if bracketed && !ip.is_ipv6() {
        return Err(format!("'[{host}]': only an IPv6 address goes in brackets"));
    }
    let port: u16 = match port.parse() {
        Ok(p) if p != 0 && !port.starts_with('+') => p,
        _ => return Err(format!("'{port}' is not a port number (1-65535)")),
    };
    Ok(WorkloadApiAddress::Tcp(SocketAddr::new(ip, port)))
}

/// Decodes `%XX` escapes (RFC 3986, 2.1); a stray `%` is an error, not a literal.
fn percent_decode(s: &str) -> Result<Vec<u8>, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok());
            match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                Some(b) => out.push(b),
                None => return Err("'%' must start an escape such as %20".into()),
            }
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    Ok(out)
}
