//! `auth.hba_file`: which clients may log in, from where, and how they prove it,
//! in PostgreSQL's pg_hba.conf format (PgBouncer's `auth_type = hba`).
//!
//! Each line is `local DATABASE USER METHOD` or `host|hostssl|hostnossl DATABASE
//! USER ADDRESS METHOD`; the first line that matches a login decides it, and a
//! login no line matches is refused. pgwarden reads the subset a pooler can
//! honour: it refuses, with the line and the reason, every keyword it would
//! otherwise have to ignore (groups, included files, host names, `samenet`,
//! methods such as `ldap` or `ident`, options), so that a file never allows more
//! than it reads as allowing.

use std::fmt;
use std::net::IpAddr;
use std::path::Path;

use crate::address::Address;
use crate::config::{AuthMethod, ConfigError};

/// The parsed file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hba {
    rules: Vec<Rule>,
}

/// One line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// its line number in the file, for logs
    pub line: usize,
    kind: Kind,
    databases: Names,
    users: Names,
    network: Option<Network>,
    /// what the line does with a login it matches
    pub method: Method,
}

/// What a line does with a login.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// trust, md5 or scram-sha-256, as `auth.type` would
    As(AuthMethod),
    /// refuse it
    Reject,
    /// a local client is the operating-system user it runs as
    Peer,
    /// a TLS client's certificate names the user
    Cert,
}

/// The connection types a line is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Local,
    Host,
    HostSsl,
    HostNoSsl,
}

/// A database or user field: `all`, or a list of names (with `sameuser` for databases).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Names {
    All,
    List { names: Vec<String>, same_user: bool },
}

/// An address field: `all`, or an address with a mask, of one family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Network {
    All,
    Range { v4: bool, addr: u128, mask: u128 },
}

/// Where a login comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// pgwarden's Unix-domain socket
    Local,
    /// TCP from `ip`, encrypted or not
    Tcp {
        /// the client's address
        ip: IpAddr,
        /// whether the connection is TLS
        tls: bool,
    },
}

impl Origin {
    /// Where a client on `peer` logs in from, over TLS or not.
    pub fn of(peer: &Address, tls: bool) -> Origin {
        match peer {
            Address::Tcp(addr) => Origin::Tcp { ip: addr.ip(), tls },
            Address::Local { .. } => Origin::Local,
        }
    }
}

/// As PostgreSQL names a client in its refusals: the address, or `[local]`.
impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Local => f.write_str("[local]"),
            Origin::Tcp { ip, .. } => ip.to_canonical().fmt(f),
        }
    }
}

impl Hba {
    /// Reads and parses the file at `path`.
    pub fn load(path: &Path) -> Result<Hba, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::new(path, "(file)", format!("cannot read: {e}")))?;
        Hba::parse(&text, path)
    }

    /// Parses the file's text; `path` only names the file in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Hba, ConfigError> {
        let at =
            |line: usize, reason: String| ConfigError::new(path, format!("line {line}"), reason);
        let mut rules = Vec::new();
        let mut pending: Option<(usize, String)> = None;
        for (i, raw) in text.lines().enumerate() {
            let (start, mut joined) = pending.take().unwrap_or((i + 1, String::new()));
            // A backslash at the end continues the record on the next line.
            match raw.strip_suffix('\\') {
                Some(head) => {
                    joined.push_str(head);
                    joined.push(' ');
                    pending = Some((start, joined));
                    continue;
                }
                None => joined.push_str(raw),
            }
            let fields = tokens(&joined).map_err(|reason| at(start, reason))?;
            if fields.is_empty() {
                continue;
            }
            rules.push(Rule::parse(start, &fields).map_err(|reason| at(start, reason))?);
        }
        if let Some((start, _)) = pending {
            return Err(at(
                start,
                "the file ends inside a record continued with a backslash".into(),
            ));
        }
        Ok(Hba { rules })
    }

    /// The first line that matches a login of `user` to `database` from `origin`.
    pub fn rule_for(&self, origin: Origin, database: &str, user: &str) -> Option<&Rule> {
        self.rules
            .iter()
            .find(|r| r.matches(origin, database, user))
    }

    /// The first line whose method is `cert`.
    pub fn cert_line(&self) -> Option<usize> {
        self.rules
            .iter()
            .find(|r| r.method == Method::Cert)
            .map(|r| r.line)
    }

    /// Lines that let anyone from beyond loopback in without a password, for the
    /// unsafe-settings warnings.
    pub fn open_trust_lines(&self) -> Vec<usize> {
        self.rules
            .iter()
            .filter(|r| {
                r.method == Method::As(AuthMethod::Trust)
                    && r.kind != Kind::Local
                    && r.network.is_some_and(|n| !n.is_loopback_only())
            })
            .map(|r| r.line)
            .collect()
    }
}

/// One field of a record; `quoted` keeps a quoted `all` from being the keyword.
struct Token {
    text: String,
    quoted: bool,
}

/// Splits a record into fields, each a comma-separated list of tokens. Double
/// quotes protect spaces, commas and `#`; `""` inside quotes is a quote.
fn tokens(line: &str) -> Result<Vec<Vec<Token>>, String> {
    let mut fields: Vec<Vec<Token>> = Vec::new();
    let mut chars = line.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        match chars.peek() {
            None | Some('#') => return Ok(fields),
            Some(_) => {}
        }
        let mut field = Vec::new();
        loop {
            let mut token = Token {
                text: String::new(),
                quoted: false,
            };
            let mut in_quotes = false;
            while let Some(&c) = chars.peek() {
                if in_quotes {
                    chars.next();
                    if c == '"' {
                        if chars.next_if_eq(&'"').is_some() {
                            token.text.push('"');
                        } else {
                            in_quotes = false;
                        }
                    } else {
                        token.text.push(c);
                    }
                } else if c == '"' {
                    chars.next();
                    in_quotes = true;
                    token.quoted = true;
                } else if c.is_whitespace() || c == ',' || c == '#' {
                    break;
                } else {
                    chars.next();
                    token.text.push(c);
                }
            }
            if in_quotes {
                return Err("unterminated quoted string".into());
            }
            field.push(token);
            if chars.next_if_eq(&',').is_none() {
                break;
            }
        }
        fields.push(field);
    }
}

impl Rule {
    fn parse(line: usize, fields: &[Vec<Token>]) -> Result<Rule, String> {
        let word = |i: usize, what: &str| -> Result<&Token, String> {
            match fields.get(i).map(Vec::as_slice) {
                Some([one]) => Ok(one),
                Some(_) => Err(format!("the {what} field takes one value, not a list")),
                None => Err(format!("the {what} field is missing")),
            }
        };
        let kind = match word(0, "connection type")?.text.as_str() {
            "local" => Kind::Local,
            "host" => Kind::Host,
            "hostssl" => Kind::HostSsl,
            "hostnossl" => Kind::HostNoSsl,
            "hostgssenc" | "hostnogssenc" => {
                return Err(
                    "GSSAPI encryption is not supported; use host, hostssl or hostnossl".into(),
                );
            }
            other => {
                return Err(format!(
                    "unknown connection type \"{other}\": expected local, host, hostssl or hostnossl"
                ));
            }
        };
        let databases = names(fields.get(1), "database", true)?;
        let users = names(fields.get(2), "user", false)?;
        let mut next = 3;
        let network = if kind == Kind::Local {
            None
        } else {
            let address = word(next, "address")?;
            next += 1;
            let network = if address.text.contains('/') || address.quoted {
                Network::parse(&address.text, None)?
            } else if address.text == "all" {
                Network::All
            } else {
                let mask = word(next, "mask")
                    .ok()
                    .filter(|m| m.text.parse::<IpAddr>().is_ok());
                if mask.is_some() {
                    next += 1;
                }
                Network::parse(&address.text, mask.map(|m| m.text.as_str()))?
            };
            Some(network)
        };
        let method = match word(next, "method")?.text.as_str() {
            "trust" => Method::As(AuthMethod::Trust),
            "md5" => Method::As(AuthMethod::Md5),
            "scram-sha-256" => Method::As(AuthMethod::ScramSha256),
            "reject" => Method::Reject,
            "peer" if kind == Kind::Local => Method::Peer,
            "peer" => return Err("peer authentication is only for local connections".into()),
            "cert" if kind == Kind::HostSsl => Method::Cert,
            "cert" => return Err("cert authentication is only for hostssl lines".into()),
            other => {
                return Err(format!(
                    "authentication method \"{other}\" is not supported: use trust, reject, md5, scram-sha-256, peer or cert"
                ));
            }
        };
        if fields.len() > next + 1 {
            return Err("authentication options are not supported".into());
        }
        Ok(Rule {
            line,
            kind,
            databases,
            users,
            network,
            method,
        })
    }

    fn matches(&self, origin: Origin, database: &str, user: &str) -> bool {
        let place = match (self.kind, origin) {
            (Kind::Local, Origin::Local) => true,
            (Kind::Host, Origin::Tcp { ip, .. }) => self.network_has(ip),
            (Kind::HostSsl, Origin::Tcp { ip, tls }) => tls && self.network_has(ip),
            (Kind::HostNoSsl, Origin::Tcp { ip, tls }) => !tls && self.network_has(ip),
            _ => false,
        };
        place && self.databases.has(database, user) && self.users.has(user, user)
    }

    fn network_has(&self, ip: IpAddr) -> bool {
        self.network.is_some_and(|n| n.has(ip))
    }
}

/// Reads a database or user field.
fn names(field: Option<&Vec<Token>>, what: &str, database: bool) -> Result<Names, String> {
    let field = field.ok_or_else(|| format!("the {what} field is missing"))?;
    let mut list = Vec::new();
    let mut same_user = false;
    for token in field {
        let text = token.text.as_str();
        if token.quoted {
            list.push(token.text.clone());
            continue;
        }
        match text {
            "all" if field.len() == 1 => return Ok(Names::All),
            "all" => return Err(format!("\"all\" cannot be part of a {what} list")),
            "sameuser" if database => same_user = true,
            // Replication connections are refused at startup whatever the file says.
            "replication" if database => {}
            "samerole" | "samegroup" if database => {
                return Err(
                    "samerole is not supported: pgwarden does not know role membership".into(),
                );
            }
            _ if text.starts_with('+') && !database => {
                return Err(format!(
                    "group \"{text}\" is not supported: pgwarden does not know role membership; list the users"
                ));
            }
            _ if text.starts_with('@') => {
                return Err(format!("included files (\"{text}\") are not supported"));
            }
            _ if text.starts_with('/') => {
                return Err(format!(
                    "regular expressions (\"{text}\") are not supported"
                ));
            }
            _ if text.is_empty() => return Err(format!("empty {what} name")),
            _ => list.push(token.text.clone()),
        }
    }
    Ok(Names::List {
        names: list,
        same_user,
    })
}

impl Names {
    fn has(&self, name: &str, user: &str) -> bool {
        match self {
            Names::All => true,
            Names::List { names, same_user } => {
                (*same_user && name == user) || names.iter().any(|n| n == name)
            }
        }
    }
}

impl Network {
    /// An address with a `/bits` suffix, or with a separate dotted or colon mask.
    fn parse(text: &str, mask: Option<&str>) -> Result<Network, String> {
        if matches!(text, "samehost" | "samenet") {
            return Err(format!(
                "\"{text}\" is not supported: write the addresses (e.g. 10.0.0.0/8)"
            ));
        }
        let (addr, prefix) = match text.split_once('/') {
            Some((a, p)) => {
                let p = p
                    .parse::<u32>()
                    .map_err(|_| format!("\"{p}\" is not a prefix length in \"{text}\""))?;
                (a, Some(p))
            }
            None => (text, None),
        };
        let ip: IpAddr = addr.parse().map_err(|_| {
            format!("\"{addr}\" is not an IP address (host names are not supported)")
        })?;
        let (v4, addr, width) = bits(ip);
        let mask = match (prefix, mask) {
            (Some(_), Some(_)) => return Err("give a prefix length or a mask, not both".into()),
            (None, None) => return Err(format!("\"{text}\" needs a prefix length or a mask")),
            (Some(p), None) if p > width => {
                return Err(format!("prefix length {p} is over {width} in \"{text}\""));
            }
            (Some(0), None) => 0,
            (Some(p), None) => (u128::MAX >> (128 - p)) << (width - p),
            (None, Some(m)) => {
                let m: IpAddr = m.parse().map_err(|_| format!("\"{m}\" is not a mask"))?;
                match bits(m) {
                    (family, m, _) if family == v4 => m,
                    _ => {
                        return Err(format!(
                            "the mask of \"{text}\" is of the other address family"
                        ));
                    }
                }
            }
        };
        Ok(Network::Range {
            v4,
            addr: addr & mask,
            mask,
        })
    }

    /// True when `ip` is in the network. As in PostgreSQL, an IPv4 network holds
    /// only IPv4 clients; an IPv4 client on a dual-stack socket counts as IPv4.
    fn has(self, ip: IpAddr) -> bool {
        match self {
            Network::All => true,
            Network::Range { v4, addr, mask } => {
                let (family, ip, _) = bits(ip.to_canonical());
                family == v4 && ip & mask == addr
            }
        }
    }

    fn is_loopback_only(self) -> bool {
        match self {
            Network::All => false,
            Network::Range {
                v4: true,
                addr,
                mask,
            } => mask >= 0xff00_0000 && addr >> 24 == 127,
            Network::Range { addr, mask, .. } => mask == u128::MAX && addr == 1,
        }
    }
}

/// An address as (whether it is IPv4, its bits, how many bits it has).
fn bits(ip: IpAddr) -> (bool, u128, u32) {
    match ip {
        IpAddr::V4(a) => (true, u128::from(u32::from(a)), 32),
        IpAddr::V6(a) => (false, u128::from(a), 128),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Hba, String> {
        Hba::parse(text, Path::new("hba.conf")).map_err(|e| e.to_string())
    }

    fn tcp(ip: &str, tls: bool) -> Origin {
        Origin::Tcp {
            ip: ip.parse().unwrap(),
            tls,
        }
    }

    fn line(hba: &Hba, origin: Origin, db: &str, user: &str) -> Option<(usize, Method)> {
        hba.rule_for(origin, db, user).map(|r| (r.line, r.method))
    }

    #[test]
    fn the_first_matching_line_decides() {
        let hba = parse(
            "# TYPE  DATABASE  USER  ADDRESS  METHOD\n\
             local   pgwarden  all             peer\n\
             local   all       all             reject   # no local apps\n\
             \n\
             hostssl app,sales alice,\"Bob Smith\" 10.1.0.0/16  scram-sha-256\n\
             hostnossl sameuser all 192.168.1.0 255.255.255.0 md5\n\
             host    all       all   ::1/128    trust\n\
             hostssl all       all   fe80::/10  cert\n\
             host    \"all\"   all   0.0.0.0/0  scram-sha-256\n",
        )
        .unwrap();
        let scram = Method::As(AuthMethod::ScramSha256);
        assert_eq!(
            line(&hba, Origin::Local, "pgwarden", "x"),
            Some((2, Method::Peer))
        );
        assert_eq!(
            line(&hba, Origin::Local, "app", "x"),
            Some((3, Method::Reject))
        );
        assert_eq!(
            line(&hba, tcp("10.1.2.3", true), "sales", "Bob Smith"),
            Some((5, scram))
        );
        assert_eq!(line(&hba, tcp("10.1.2.3", false), "sales", "alice"), None);
        assert_eq!(line(&hba, tcp("10.2.0.1", true), "app", "alice"), None);
        assert_eq!(
            line(&hba, tcp("192.168.1.9", false), "carol", "carol"),
            Some((6, Method::As(AuthMethod::Md5)))
        );
        assert_eq!(line(&hba, tcp("192.168.1.9", true), "carol", "carol"), None);
        assert_eq!(line(&hba, tcp("192.168.1.9", false), "app", "carol"), None);
        assert_eq!(
            line(&hba, tcp("::1", false), "app", "z"),
            Some((7, Method::As(AuthMethod::Trust)))
        );
        // A quoted "all" is a database named all, and an IPv4 rule holds IPv4 clients only,
        // also when they arrive on a dual-stack socket.
        assert_eq!(
            line(&hba, tcp("10.9.9.9", false), "all", "z"),
            Some((9, scram))
        );
        assert_eq!(
            line(&hba, tcp("::ffff:10.9.9.9", false), "all", "z"),
            Some((9, scram))
        );
        assert_eq!(line(&hba, tcp("fe80::1", false), "all", "z"), None);
        assert_eq!(
            line(&hba, tcp("fe80::1", true), "all", "z"),
            Some((8, Method::Cert))
        );
        assert_eq!(hba.cert_line(), Some(8));
        assert_eq!(line(&hba, tcp("10.9.9.9", false), "app", "z"), None);
        assert_eq!(hba.open_trust_lines(), Vec::<usize>::new());
    }

    #[test]
    fn continued_lines_and_masks() {
        let hba = parse("host all all \\\n 127.0.0.0/8 \\\n trust\nhost all all 0.0.0.0/0 trust\n")
            .unwrap();
        assert_eq!(
            line(&hba, tcp("127.4.5.6", false), "d", "u").map(|l| l.0),
            Some(1)
        );
        assert_eq!(
            line(&hba, tcp("8.8.8.8", false), "d", "u").map(|l| l.0),
            Some(4)
        );
        assert_eq!(hba.open_trust_lines(), [4]);
        let v6 = parse("host all all fe80::/10 md5\nhost all all ::/0 reject\n").unwrap();
        assert_eq!(
            line(&v6, tcp("fe80::1", false), "d", "u").map(|l| l.0),
            Some(1)
        );
        assert_eq!(
            line(&v6, tcp("febf::1", false), "d", "u").map(|l| l.0),
            Some(1)
        );
        assert_eq!(
            line(&v6, tcp("fec0::1", false), "d", "u").map(|l| l.0),
            Some(2)
        );
        assert_eq!(line(&v6, tcp("10.0.0.1", false), "d", "u"), None);
        assert_eq!(
            parse("host all all all reject\n").unwrap().rules[0].network,
            Some(Network::All)
        );
    }

    #[test]
    fn what_pgwarden_cannot_honour_is_refused_with_the_line() {
        for (text, reason) in [
            (
                "host all all 10.0.0.0/8 ldap",
                "method \"ldap\" is not supported",
            ),
            ("host all all 10.0.0.0/8 peer", "only for local"),
            ("host all all 10.0.0.0/8 cert", "only for hostssl"),
            (
                "host all all 10.0.0.0/8 md5 clientcert=verify-full",
                "options",
            ),
            ("host all +admins 10.0.0.0/8 md5", "group \"+admins\""),
            ("host samerole all 10.0.0.0/8 md5", "samerole"),
            ("host @dbs all 10.0.0.0/8 md5", "included files"),
            (
                "host all all db.example.com md5",
                "host names are not supported",
            ),
            ("host all all samenet md5", "\"samenet\" is not supported"),
            ("host all all 10.0.0.0/33 md5", "over 32"),
            (
                "host all all 10.0.0.1 md5",
                "needs a prefix length or a mask",
            ),
            ("host all all 10.0.0.0 ffff:: md5", "other address family"),
            ("hostgssenc all all 10.0.0.0/8 md5", "GSSAPI"),
            ("remote all all 10.0.0.0/8 md5", "unknown connection type"),
            ("host all all 10.0.0.0/8", "method field is missing"),
            ("local all", "user field is missing"),
            ("local all,app u md5", "\"all\" cannot be part"),
            ("local \"app u md5", "unterminated"),
            ("local all all \\", "ends inside a record"),
        ] {
            let text = format!("# comment\n{text}\n");
            let err = parse(&text).unwrap_err();
            assert!(err.starts_with("hba.conf: line 2: "), "{text}: {err}");
            assert!(err.contains(reason), "{text}: {err}");
        }
    }
}
