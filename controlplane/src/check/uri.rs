//! What `uturn check` probes: RFC 7065 TURN URIs (`turn:`, `turns:`), RFC 7064 STUN URIs
//! (`stun:`, `stuns:`) and a WebRTC `iceServers` JSON list (W3C RTCConfiguration) with the
//! credentials of each entry.

use serde::Serialize;

/// The URI scheme (RFC 7064 §3.1, RFC 7065 §3.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scheme {
    /// `stun:`: only the Binding steps run.
    Stun,
    /// `stuns:`: STUN over TLS.
    Stuns,
    /// `turn:`: every step.
    Turn,
    /// `turns:`: TURN over TLS.
    Turns,
}

impl Scheme {
    /// True for `turn:` and `turns:` (the TURN steps run).
    pub fn is_turn(self) -> bool {
        matches!(self, Scheme::Turn | Scheme::Turns)
    }
}

/// The transport to the server (RFC 7065 §3.1 `transport=`; `turns:`/`stuns:` mean TLS over TCP):
/// the relay's own [`uturn_proto::Transport`].
pub use uturn_proto::Transport;

/// One parsed URI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerUri {
    /// The scheme.
    pub scheme: Scheme,
    /// Host name or IP literal (without the brackets of an IPv6 literal).
    pub host: String,
    /// Port: the URI's, else 3478 (`stun:`, `turn:`) or 5349 (`stuns:`, `turns:`).
    pub port: u16,
    /// The transport.
    pub transport: Transport,
    /// The URI as given.
    pub text: String,
}

/// Parses `turn:host[:port][?transport=udp|tcp]`, `turns:host[:port][?transport=tcp]`,
/// `stun:host[:port]` or `stuns:host[:port]`; an IPv6 host is bracketed (`turn:[::1]:3478`).
/// Errors (a sentence for the user): unknown scheme, empty host, bad port, an unknown query
/// key, a transport other than udp/tcp, or `turns:`/`stuns:` with `transport=udp` (DTLS is not
/// supported).
pub fn parse(text: &str) -> Result<ServerUri, String> {
    let bad = |why: &str| format!("{text:?}: {why}");
    let (scheme, rest) = text.split_once(':').ok_or_else(|| bad("not a URI (turn:, turns:, stun: or stuns:)"))?;
    let scheme = match scheme.to_ascii_lowercase().as_str() {
        "stun" => Scheme::Stun,
        "stuns" => Scheme::Stuns,
        "turn" => Scheme::Turn,
        "turns" => Scheme::Turns,
        _ => return Err(bad("unknown scheme (turn:, turns:, stun: or stuns:)")),
    };
    let (hostport, query) = match rest.split_once('?') {
        Some((h, q)) => (h, Some(q)),
        None => (rest, None),
    };
    let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
        let (host, after) = v6.split_once(']').ok_or_else(|| bad("unclosed '[' in the host"))?;
        match after {
            "" => (host, None),
            p => (host, Some(p.strip_prefix(':').ok_or_else(|| bad("junk after ']'"))?)),
        }
    } else {
        match hostport.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (hostport, None),
        }
    };
    if host.is_empty() || host.contains('/') || host.contains('@') {
        return Err(bad("no valid host"));
    }
    let tls = matches!(scheme, Scheme::Stuns | Scheme::Turns);
    let port = match port {
        Some(p) => p.parse::<u16>().ok().filter(|&p| p != 0).ok_or_else(|| bad("bad port"))?,
        None if tls => 5349,
        None => 3478,
    };
    let mut transport = if tls { Transport::Tls } else { Transport::Udp };
    for pair in query.into_iter().flat_map(|q| q.split('&')) {
        match pair.split_once('=') {
            Some(("transport", "udp")) if tls => return Err(bad("DTLS (turns: over udp) is not supported")),
            Some(("transport", "udp")) => transport = Transport::Udp,
            Some(("transport", "tcp")) if !tls => transport = Transport::Tcp,
            Some(("transport", "tcp")) => {}
            Some(("transport", t)) => return Err(bad(&format!("unknown transport {t:?} (udp or tcp)"))),
            _ => return Err(bad(&format!("unknown query {pair:?} (only transport=udp|tcp)"))),
        }
    }
    Ok(ServerUri { scheme, host: host.to_owned(), port, transport, text: text.to_owned() })
}

/// One server of an `iceServers` list, with the entry's credentials.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IceServer {
    /// The server.
    pub uri: ServerUri,
    /// The entry's `username`.
    pub username: Option<String>,
    /// The entry's `credential`.
    pub credential: Option<String>,
}

/// Every URL of an `iceServers` JSON document: `{"iceServers": [...]}` or a bare array, each
/// entry with `urls` (a string or an array of strings; the legacy `url` too) and optional
/// `username` and `credential`. Errors: not JSON, no list, an entry without URLs, or a URL
/// [`parse`] refuses.
pub fn parse_ice_servers(json: &str) -> Result<Vec<IceServer>, String> {
    let v: serde_json::Value = serde_json::from_str(json).map_err(|e| format!("iceServers JSON: {e}"))?;
    let list = match &v {
        serde_json::Value::Array(a) => a,
        serde_json::Value::Object(o) => match o.get("iceServers") {
            Some(serde_json::Value::Array(a)) => a,
            _ => return Err("iceServers JSON: no \"iceServers\" array".into()),
        },
        _ => return Err("iceServers JSON: neither an object nor an array".into()),
    };
    let mut out = Vec::new();
    for (i, entry) in list.iter().enumerate() {
        let text = |k: &str| entry.get(k).and_then(|v| v.as_str()).map(str::to_owned);
        let urls: Vec<String> = match entry.get("urls").or_else(|| entry.get("url")) {
            Some(serde_json::Value::String(s)) => vec![s.clone()],
            Some(serde_json::Value::Array(a)) => a.iter().filter_map(|u| u.as_str().map(str::to_owned)).collect(),
            _ => Vec::new(),
        };
        if urls.is_empty() {
            return Err(format!("iceServers JSON: entry {i} has no urls"));
        }
        for u in urls {
            out.push(IceServer { uri: parse(&u)?, username: text("username"), credential: text("credential") });
        }
    }
    if out.is_empty() {
        return Err("iceServers JSON: the list is empty".into());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc7065_forms() {
        let u = parse("turn:example.org").unwrap();
        assert_eq!(
            (u.scheme, u.host.as_str(), u.port, u.transport),
            (Scheme::Turn, "example.org", 3478, Transport::Udp)
        );
        let u = parse("turn:192.0.2.1:3479?transport=tcp").unwrap();
        assert_eq!((u.port, u.transport), (3479, Transport::Tcp));
        let u = parse("turns:example.org?transport=tcp").unwrap();
        assert_eq!((u.port, u.transport), (5349, Transport::Tls));
        let u = parse("turn:[::1]:3478?transport=udp").unwrap();
        assert_eq!((u.host.as_str(), u.port), ("::1", 3478));
        let u = parse("stun:[2001:db8::1]").unwrap();
        assert_eq!((u.scheme, u.host.as_str(), u.port), (Scheme::Stun, "2001:db8::1", 3478));
    }

    #[test]
    fn bad_uris_are_refused() {
        for s in [
            "http://x",
            "turn:",
            "turn:host:0",
            "turn:host:99999",
            "turn:host?transport=sctp",
            "turns:host?transport=udp",
            "turn:host?foo=bar",
            "turn:[::1",
            "x",
        ] {
            assert!(parse(s).is_err(), "{s}");
        }
    }

    #[test]
    fn ice_servers_forms() {
        let j = r#"{"iceServers":[{"urls":"stun:a"},{"urls":["turn:b:1","turns:b"],"username":"u","credential":"p"}]}"#;
        let l = parse_ice_servers(j).unwrap();
        assert_eq!(l.len(), 3);
        assert_eq!(l[1].username.as_deref(), Some("u"));
        assert_eq!(l[2].uri.transport, Transport::Tls);
        assert_eq!(parse_ice_servers(r#"[{"url":"turn:x"}]"#).unwrap().len(), 1);
        assert!(parse_ice_servers("{}").is_err());
        assert!(parse_ice_servers(r#"[{"username":"u"}]"#).is_err());
        assert!(parse_ice_servers("[]").is_err());
    }
}
