//! Bootstrap through a discovery URL, with etcd's v2 discovery protocol: read the
//! expected size, register this member under its ID (only if that ID is new), wait
//! until enough members registered, and take the first ones by creation index as
//! the initial cluster.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::Deserialize;

type HttpClient = Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

/// Why discovery failed, with etcd's messages where etcd has them.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The discovery URL has no `_config/size`.
    #[error("discovery: size key not found")]
    SizeNotFound,
    /// `_config/size` is not a number.
    #[error("discovery: bad size key")]
    BadSizeKey,
    /// The cluster already has its members.
    #[error("discovery: cluster is full")]
    FullCluster,
    /// A member with this ID registered already.
    #[error("discovery: found duplicate id")]
    DuplicateId,
    /// Talking to the discovery service failed.
    #[error("discovery: {0}")]
    Http(String),
}

#[derive(Debug, Deserialize)]
struct Reply {
    node: Option<Node>,
    index: Option<u64>,
}

#[derive(Debug, Clone, Deserialize)]
struct Node {
    key: String,
    value: Option<String>,
    #[serde(default)]
    nodes: Vec<Node>,
    #[serde(rename = "createdIndex", default)]
    created_index: u64,
    #[serde(rename = "modifiedIndex", default)]
    modified_index: u64,
}

struct Discovery {
    client: HttpClient,
    url: String,
}

impl Discovery {
    async fn request(
        &self,
        method: hyper::Method,
        url: &str,
        body: Option<String>,
    ) -> Result<(u16, Option<u64>, Vec<u8>), Error> {
        let mut builder = hyper::Request::builder().method(method).uri(url);
        if body.is_some() {
            builder = builder.header("content-type", "application/x-www-form-urlencoded");
        }
        let request = builder
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| Error::Http(e.to_string()))?;
        let response = self
            .client
            .request(request)
            .await
            .map_err(|e| Error::Http(format!("{url}: {e}")))?;
        let status = response.status().as_u16();
        let index = response
            .headers()
            .get("x-etcd-index")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| Error::Http(format!("{url}: {e}")))?
            .to_bytes()
            .to_vec();
        Ok((status, index, body))
    }

    async fn size(&self) -> Result<usize, Error> {
        let url = format!("{}/_config/size", self.url);
        let (status, _, body) = self.request(hyper::Method::GET, &url, None).await?;
        if status == 404 {
            return Err(Error::SizeNotFound);
        }
        let reply: Reply =
            serde_json::from_slice(&body).map_err(|e| Error::Http(format!("{url}: {e}")))?;
        reply
            .node
            .and_then(|node| node.value)
            .and_then(|value| value.parse().ok())
            .ok_or(Error::BadSizeKey)
    }

    async fn register(&self, member_id: u64, value: &str) -> Result<(), Error> {
        let url = format!("{}/{member_id:x}?prevExist=false", self.url);
        let body = format!("value={}", form_encode(value));
        let (status, _, body) = self.request(hyper::Method::PUT, &url, Some(body)).await?;
        match status {
            200 | 201 => Ok(()),
            412 => Err(Error::DuplicateId),
            _ => Err(Error::Http(format!(
                "registering at {url}: HTTP {status}: {}",
                String::from_utf8_lossy(&body)
            ))),
        }
    }

    /// The registered members, oldest first, and the index to wait after.
    async fn members(&self) -> Result<(Vec<Node>, u64), Error> {
        let url = format!("{}?recursive=true", self.url);
        let (_, index, body) = self.request(hyper::Method::GET, &url, None).await?;
        let reply: Reply =
            serde_json::from_slice(&body).map_err(|e| Error::Http(format!("{url}: {e}")))?;
        let mut nodes: Vec<Node> = reply
            .node
            .map(|node| node.nodes)
            .unwrap_or_default()
            .into_iter()
            .filter(|node| !node.key.ends_with("/_config") && node.value.is_some())
            .collect();
        nodes.sort_by_key(|node| node.created_index);
        Ok((nodes, index.or(reply.index).unwrap_or(0)))
    }

    async fn wait(&self, after: u64) -> Result<u64, Error> {
        let url = format!(
            "{}?wait=true&recursive=true&waitIndex={}",
            self.url,
            after + 1
        );
        let (_, _, body) = self.request(hyper::Method::GET, &url, None).await?;
        let reply: Reply =
            serde_json::from_slice(&body).map_err(|e| Error::Http(format!("{url}: {e}")))?;
        Ok(reply.node.map_or(after + 1, |node| node.modified_index))
    }
}

fn form_encode(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Joins the cluster at discovery URL `url` as `name` with `peer_urls`; returns the
/// initial cluster (`name=peerURL,...`) once `_config/size` members registered.
pub async fn join(
    url: &str,
    member_id: u64,
    name: &str,
    peer_urls: &[String],
) -> Result<String, Error> {
    let discovery = Discovery {
        client: Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build_http(),
        url: url.trim_end_matches('/').to_string(),
    };
    let size = discovery.size().await?;
    let (existing, _) = discovery.members().await?;
    let own_key = format!("/{member_id:x}");
    if existing.len() >= size
        && !existing
            .iter()
            .take(size)
            .any(|n| n.key.ends_with(&own_key))
    {
        return Err(Error::FullCluster);
    }
    let value = peer_urls
        .iter()
        .map(|url| format!("{name}={url}"))
        .collect::<Vec<_>>()
        .join(",");
    discovery.register(member_id, &value).await?;
    tracing::info!(%url, size, "registered with the discovery service");
    loop {
        let (nodes, index) = discovery.members().await?;
        if nodes.len() >= size {
            if !nodes.iter().take(size).any(|n| n.key.ends_with(&own_key)) {
                return Err(Error::FullCluster);
            }
            let cluster = nodes
                .iter()
                .take(size)
                .filter_map(|node| node.value.clone())
                .collect::<Vec<_>>()
                .join(",");
            return Ok(cluster);
        }
        tracing::info!(
            found = nodes.len(),
            size,
            "waiting for more members to register"
        );
        discovery.wait(index).await?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_form_encoded() {
        assert_eq!(
            form_encode("m0=http://127.0.0.1:2380"),
            "m0%3Dhttp%3A%2F%2F127.0.0.1%3A2380"
        );
    }
}
