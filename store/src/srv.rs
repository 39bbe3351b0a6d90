//! Bootstrap from DNS SRV records (`--discovery-srv`), as etcd does it: the members
//! of `_etcd-server-ssl._tcp.<domain>` (https) and `_etcd-server._tcp.<domain>`
//! (http), with `-<name>` after `etcd-server` when `--discovery-srv-name` is set,
//! become the initial cluster. The entry whose address is this member's advertised
//! peer address gets this member's name; the others are numbered. The nameservers
//! are those of /etc/resolv.conf, as for every other lookup.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

use crate::config::MemberUrl;

const TYPE_SRV: u16 = 33;
const CLASS_IN: u16 = 1;
const QUERY_TIMEOUT: Duration = Duration::from_secs(3);

/// One SRV record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Srv {
    pub priority: u16,
    pub weight: u16,
    pub port: u16,
    /// The target host, without the trailing dot.
    pub target: String,
}

/// The nameservers of a resolv.conf text; the local one when it names none (as
/// Go's resolver assumes).
fn nameservers(resolv_conf: &str) -> Vec<SocketAddr> {
    let servers: Vec<SocketAddr> = resolv_conf
        .lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            (words.next() == Some("nameserver"))
                .then(|| words.next())
                .flatten()
                .and_then(|address| address.parse::<IpAddr>().ok())
                .map(|ip| SocketAddr::new(ip, 53))
        })
        .collect();
    if servers.is_empty() {
        vec![SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 53)]
    } else {
        servers
    }
}

/// A DNS query for the SRV records of `name`.
fn query(id: u16, name: &str) -> Vec<u8> {
    let mut message = Vec::with_capacity(64);
    message.extend_from_slice(&id.to_be_bytes());
    message.extend_from_slice(&0x0100u16.to_be_bytes()); // recursion desired
    message.extend_from_slice(&1u16.to_be_bytes()); // one question
    message.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
    for label in name.trim_end_matches('.').split('.') {
        message.push(label.len() as u8);
        message.extend_from_slice(label.as_bytes());
    }
    message.push(0);
    message.extend_from_slice(&TYPE_SRV.to_be_bytes());
    message.extend_from_slice(&CLASS_IN.to_be_bytes());
    message
}

fn u16_at(message: &[u8], at: usize) -> Result<u16, String> {
    message
        .get(at..at + 2)
        .map(|b| u16::from_be_bytes([b[0], b[1]]))
        .ok_or_else(|| "truncated DNS answer".to_string())
}

/// The domain name at `at` (compression pointers followed) and the position after
/// it in the message.
fn name_at(message: &[u8], mut at: usize) -> Result<(String, usize), String> {
    let mut labels = Vec::new();
    let mut end = None;
    for _ in 0..128 {
        let length = *message.get(at).ok_or("truncated DNS name")? as usize;
        if length & 0xc0 == 0xc0 {
            let pointer = (u16_at(message, at)? & 0x3fff) as usize;
            end.get_or_insert(at + 2);
            at = pointer;
            continue;
        }
        if length == 0 {
            return Ok((labels.join("."), end.unwrap_or(at + 1)));
        }
        let label = message
            .get(at + 1..at + 1 + length)
            .ok_or("truncated DNS label")?;
        labels.push(String::from_utf8_lossy(label).into_owned());
        at += 1 + length;
    }
    Err("DNS name loops".into())
}

/// The SRV records of an answer to query `id`, or why there are none.
fn parse_answer(id: u16, message: &[u8]) -> Result<Vec<Srv>, String> {
    if u16_at(message, 0)? != id {
        return Err("DNS answer to another query".into());
    }
    let flags = u16_at(message, 2)?;
    match flags & 0x000f {
        0 => {}
        3 => return Err("no such host".into()),
        // Go's words for SERVFAIL and REFUSED.
        2 | 5 => return Err("server misbehaving".into()),
        code => return Err(format!("DNS server answered with error code {code}")),
    }
    let questions = u16_at(message, 4)?;
    let answers = u16_at(message, 6)?;
    let mut at = 12;
    for _ in 0..questions {
        at = name_at(message, at)?.1 + 4;
    }
    let mut records = Vec::new();
    for _ in 0..answers {
        at = name_at(message, at)?.1;
        let kind = u16_at(message, at)?;
        let length = u16_at(message, at + 8)? as usize;
        let data = at + 10;
        if kind == TYPE_SRV {
            let (target, _) = name_at(message, data + 6)?;
            records.push(Srv {
                priority: u16_at(message, data)?,
                weight: u16_at(message, data + 2)?,
                port: u16_at(message, data + 4)?,
                target,
            });
        }
        at = data + length;
    }
    if records.is_empty() {
        return Err("no such host".into());
    }
    // By priority, then the heavier first (Go shuffles by weight).
    records.sort_by_key(|srv| (srv.priority, std::cmp::Reverse(srv.weight)));
    Ok(records)
}

async fn ask(server: SocketAddr, id: u16, question: &[u8]) -> Result<Vec<Srv>, String> {
    let bind: SocketAddr = if server.is_ipv4() {
        "0.0.0.0:0".parse().expect("address")
    } else {
        "[::]:0".parse().expect("address")
    };
    let socket = UdpSocket::bind(bind).await.map_err(|e| e.to_string())?;
    socket
        .send_to(question, server)
        .await
        .map_err(|e| e.to_string())?;
    let mut buffer = vec![0u8; 4096];
    let length = loop {
        let (length, from) = tokio::time::timeout(QUERY_TIMEOUT, socket.recv_from(&mut buffer))
            .await
            .map_err(|_| "i/o timeout".to_string())?
            .map_err(|e| e.to_string())?;
        if from == server {
            break length;
        }
    };
    let answer = &buffer[..length];
    if u16_at(answer, 2)? & 0x0200 == 0 {
        return parse_answer(id, answer);
    }
    // Truncated: ask again over TCP.
    let mut stream = tokio::time::timeout(QUERY_TIMEOUT, TcpStream::connect(server))
        .await
        .map_err(|_| "i/o timeout".to_string())?
        .map_err(|e| e.to_string())?;
    let mut framed = (question.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(question);
    stream.write_all(&framed).await.map_err(|e| e.to_string())?;
    let length = stream.read_u16().await.map_err(|e| e.to_string())? as usize;
    let mut answer = vec![0u8; length];
    stream
        .read_exact(&mut answer)
        .await
        .map_err(|e| e.to_string())?;
    parse_answer(id, &answer)
}

/// The SRV records of `_<service>._tcp.<domain>`, as Go's net.LookupSRV finds them.
pub async fn lookup_srv(service: &str, domain: &str) -> Result<Vec<Srv>, String> {
    let name = format!("_{service}._tcp.{}", domain.trim_end_matches('.'));
    let resolv_conf = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    let mut last_error = String::new();
    for server in nameservers(&resolv_conf) {
        let id = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |elapsed| elapsed.subsec_nanos())
            .wrapping_add(std::process::id()) as u16;
        match ask(server, id, &query(id, &name)).await {
            Ok(records) => return Ok(records),
            Err(error) if error == "no such host" => {
                return Err(format!("lookup {name} on {server}: no such host"))
            }
            Err(error) => last_error = format!("lookup {name} on {server}: {error}"),
        }
    }
    Err(last_error)
}

/// The first address of `host:port` (IPv4 first, as Go's ResolveTCPAddr).
async fn resolve(host: &str, port: u16) -> Result<SocketAddr, String> {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let addresses: Vec<SocketAddr> = tokio::net::lookup_host((host, port))
        .await
        .map_err(|e| format!("lookup {host}: {e}"))?
        .collect();
    addresses
        .iter()
        .find(|address| address.is_ipv4())
        .or(addresses.first())
        .copied()
        .ok_or_else(|| format!("lookup {host}: no such host"))
}

/// etcd's srv.GetCluster: `name=scheme://target:port` entries for one service.
async fn cluster_of(
    scheme: &str,
    service: &str,
    domain: &str,
    name: &str,
    advertised: &[(SocketAddr, &MemberUrl)],
) -> Result<Vec<String>, String> {
    let records = lookup_srv(service, domain)
        .await
        .map_err(|e| format!("error querying DNS SRV records for _{service} {e}"))?;
    let mut entries = Vec::new();
    let mut numbered = 0;
    let mut error = None;
    for srv in records {
        let address = match resolve(&srv.target, srv.port).await {
            Ok(address) => address,
            Err(e) => {
                error = Some(e);
                continue;
            }
        };
        let own = advertised.iter().find(|(a, _)| *a == address);
        let member = match own {
            Some(_) => name.to_string(),
            None => {
                numbered += 1;
                (numbered - 1).to_string()
            }
        };
        let host = if srv.target.contains(':') {
            format!("[{}]:{}", srv.target, srv.port)
        } else {
            format!("{}:{}", srv.target, srv.port)
        };
        match own {
            Some((_, url)) if url.scheme != scheme => {
                error = Some(format!(
                    "bootstrap at {scheme}://{host} from DNS for {service} has scheme mismatch with expected peer {url}"
                ));
            }
            _ => entries.push(format!("{member}={scheme}://{host}")),
        }
    }
    if entries.is_empty() {
        return Err(format!(
            "error querying DNS SRV records for _{service} {}",
            error.unwrap_or_else(|| "no records".into())
        ));
    }
    Ok(entries)
}

/// The initial cluster (`name=peerURL,...`) for `--discovery-srv domain`, with
/// `--discovery-srv-name`; this member (`name`, advertising `peer_urls`) must be
/// in it.
pub async fn initial_cluster(
    domain: &str,
    service_name: Option<&str>,
    name: &str,
    peer_urls: &[MemberUrl],
) -> Result<String, String> {
    let mut advertised = Vec::new();
    for url in peer_urls {
        advertised.push((resolve(&url.host, url.port).await?, url));
    }
    let suffix = service_name.map(|n| format!("-{n}")).unwrap_or_default();
    let mut entries = Vec::new();
    let mut errors = Vec::new();
    for (scheme, service) in [
        ("https", format!("etcd-server-ssl{suffix}")),
        ("http", format!("etcd-server{suffix}")),
    ] {
        match cluster_of(scheme, &service, domain, name, &advertised).await {
            Ok(found) => entries.extend(found),
            Err(error) => errors.push(error),
        }
    }
    if entries.is_empty() {
        return Err(errors.join("; "));
    }
    let cluster = entries.join(",");
    if !entries
        .iter()
        .any(|entry| entry.split_once('=').is_some_and(|(n, _)| n == name))
    {
        return Err(format!(
            "cannot find local etcd member {name:?} in SRV records"
        ));
    }
    Ok(cluster)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name_bytes(name: &str) -> Vec<u8> {
        let mut out = Vec::new();
        for label in name.split('.') {
            out.push(label.len() as u8);
            out.extend_from_slice(label.as_bytes());
        }
        out.push(0);
        out
    }

    /// An answer with two SRV records, the second target compressed.
    fn answer(id: u16) -> Vec<u8> {
        let question = query(id, "_etcd-server._tcp.example.com");
        let mut message = question.clone();
        message[2..4].copy_from_slice(&0x8180u16.to_be_bytes());
        message[6..8].copy_from_slice(&2u16.to_be_bytes());
        let target_at;
        {
            // First record: name is a pointer to the question (offset 12).
            message.extend_from_slice(&[0xc0, 12]);
            message.extend_from_slice(&TYPE_SRV.to_be_bytes());
            message.extend_from_slice(&CLASS_IN.to_be_bytes());
            message.extend_from_slice(&60u32.to_be_bytes());
            let target = name_bytes("m1.example.com");
            message.extend_from_slice(&((6 + target.len()) as u16).to_be_bytes());
            message.extend_from_slice(&[0, 10, 0, 5, 0x09, 0x4c]); // 10, 5, 2380
            target_at = message.len();
            message.extend_from_slice(&target);
        }
        {
            message.extend_from_slice(&[0xc0, 12]);
            message.extend_from_slice(&TYPE_SRV.to_be_bytes());
            message.extend_from_slice(&CLASS_IN.to_be_bytes());
            message.extend_from_slice(&60u32.to_be_bytes());
            // "m0" then a pointer to "example.com" inside the first target.
            let mut target = vec![2, b'm', b'0'];
            let example = target_at + 3;
            target.extend_from_slice(&[0xc0 | (example >> 8) as u8, example as u8]);
            message.extend_from_slice(&((6 + target.len()) as u16).to_be_bytes());
            message.extend_from_slice(&[0, 0, 0, 0, 0x09, 0x4d]); // 0, 0, 2381
            message.extend_from_slice(&target);
        }
        message
    }

    #[test]
    fn parses_srv_answers_with_compression() {
        let records = parse_answer(7, &answer(7)).unwrap();
        assert_eq!(
            records,
            vec![
                Srv {
                    priority: 0,
                    weight: 0,
                    port: 2381,
                    target: "m0.example.com".into()
                },
                Srv {
                    priority: 10,
                    weight: 5,
                    port: 2380,
                    target: "m1.example.com".into()
                },
            ]
        );
        assert!(parse_answer(8, &answer(7)).is_err());
    }

    #[test]
    fn nxdomain_and_garbage_are_errors() {
        let mut message = answer(3);
        message[3] = (message[3] & 0xf0) | 3;
        assert_eq!(parse_answer(3, &message).unwrap_err(), "no such host");
        let mut seed = 1u64;
        for _ in 0..2_000 {
            let mut bytes = answer(3);
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let at = (seed >> 33) as usize % bytes.len();
            bytes[at] = (seed >> 20) as u8;
            bytes.truncate(((seed >> 40) as usize % (bytes.len() + 1)).max(4));
            let _ = parse_answer(3, &bytes);
        }
    }

    #[test]
    fn nameservers_from_resolv_conf() {
        assert_eq!(
            nameservers("# x\nsearch example.com\nnameserver 10.0.0.2\nnameserver ::1\n"),
            vec!["10.0.0.2:53".parse().unwrap(), "[::1]:53".parse().unwrap()]
        );
        assert_eq!(nameservers(""), vec!["127.0.0.1:53".parse().unwrap()]);
    }
}
