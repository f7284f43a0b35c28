//! A minimal HTTP/1.1 client over a TCP stream we connected ourselves (from a chosen source
//! address): one request at a time, keep-alive, bodies by Content-Length or chunked. Enough
//! for SSE streams and long-polls without a connection pool per subscriber.

use anyhow::{Context, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A response head.
pub struct Head {
    pub status: u16,
    pub headers: Vec<(String, String)>,
}

impl Head {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

enum Framing {
    Length(usize),
    Chunked,
    Close,
}

/// One keep-alive connection.
pub struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
    framing: Framing,
    /// Chunked state: bytes left in the current chunk.
    chunk_left: usize,
    done: bool,
}

/// Splits "http://host:port/path?query" into (host:port, /path?query).
pub fn split_url(url: &str) -> (String, String) {
    let rest = url.trim_start_matches("http://").trim_start_matches("ws://");
    match rest.find('/') {
        Some(i) => (rest[..i].to_string(), rest[i..].to_string()),
        None => (rest.to_string(), "/".to_string()),
    }
}

impl Conn {
    pub fn new(stream: TcpStream) -> Conn {
        Conn { stream, buf: Vec::with_capacity(4096), framing: Framing::Close, chunk_left: 0, done: true }
    }

    /// Sends a GET and reads the response head.
    pub async fn get(&mut self, host: &str, path: &str, headers: &[(String, String)]) -> anyhow::Result<Head> {
        self.request("GET", host, path, headers, b"").await
    }

    /// Sends a request with a body and reads the response head.
    pub async fn request(
        &mut self,
        method: &str,
        host: &str,
        path: &str,
        headers: &[(String, String)],
        body: &[u8],
    ) -> anyhow::Result<Head> {
        let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\n");
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        if method != "GET" {
            req.push_str(&format!("Content-Length: {}\r\n", body.len()));
        }
        req.push_str("\r\n");
        let mut bytes = req.into_bytes();
        bytes.extend_from_slice(body);
        self.stream.write_all(&bytes).await?;
        let head_text = self.take_until(b"\r\n\r\n", "before the response head").await?;
        let mut lines = head_text.split("\r\n");
        let status = lines
            .next()
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|s| s.parse().ok())
            .context("status line")?;
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':').map(|(k, v)| (k.trim().to_string(), v.trim().to_string())))
            .collect();
        let head = Head { status, headers };
        self.framing = if head.header("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
            Framing::Chunked
        } else if let Some(n) = head.header("content-length").and_then(|v| v.parse().ok()) {
            Framing::Length(n)
        } else {
            Framing::Close
        };
        self.chunk_left = 0;
        self.done = matches!(self.framing, Framing::Length(0));
        Ok(head)
    }

    /// The text before the next `delimiter` (reading as needed); consumes both.
    async fn take_until(&mut self, delimiter: &[u8], what: &str) -> anyhow::Result<String> {
        let end = loop {
            if let Some(i) = self.buf.windows(delimiter.len()).position(|w| w == delimiter) {
                break i;
            }
            if self.fill().await? == 0 {
                bail!("connection closed {what}");
            }
        };
        let text = String::from_utf8_lossy(&self.buf[..end]).to_string();
        self.buf.drain(..end + delimiter.len());
        Ok(text)
    }

    /// Reads what has arrived onto the end of `buf`, straight into its spare capacity (at least
    /// 16 KiB): a zeroed buffer to read into would cost a 16 KiB memset per read, a visible
    /// share of the load generator's CPU in the send scenario.
    async fn fill(&mut self) -> anyhow::Result<usize> {
        self.buf.reserve(16 * 1024);
        Ok(self.stream.read_buf(&mut self.buf).await?)
    }

    /// The next piece of the body (None at its end).
    pub async fn next_body(&mut self) -> anyhow::Result<Option<Vec<u8>>> {
        if self.done {
            return Ok(None);
        }
        match self.framing {
            Framing::Length(left) => {
                if self.buf.is_empty() && self.fill().await? == 0 {
                    bail!("connection closed in the body");
                }
                let take = left.min(self.buf.len());
                let out: Vec<u8> = self.buf.drain(..take).collect();
                self.framing = Framing::Length(left - take);
                self.done = left == take;
                Ok(Some(out))
            }
            Framing::Close => {
                if self.buf.is_empty() && self.fill().await? == 0 {
                    self.done = true;
                    return Ok(None);
                }
                Ok(Some(std::mem::take(&mut self.buf)))
            }
            Framing::Chunked => loop {
                if self.chunk_left > 0 {
                    if self.buf.is_empty() && self.fill().await? == 0 {
                        bail!("connection closed in a chunk");
                    }
                    let take = self.chunk_left.min(self.buf.len());
                    self.chunk_left -= take;
                    let out: Vec<u8> = self.buf.drain(..take).collect();
                    if self.chunk_left == 0 {
                        self.chunk_left = usize::MAX; // the CRLF after the chunk is still to skip
                    }
                    return Ok(Some(out));
                }
                if self.chunk_left == usize::MAX {
                    while self.buf.len() < 2 {
                        if self.fill().await? == 0 {
                            bail!("connection closed after a chunk");
                        }
                    }
                    self.buf.drain(..2);
                    self.chunk_left = 0;
                }
                let size_text = self.take_until(b"\r\n", "at a chunk size").await?;
                let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("0").trim(), 16)?;
                if size == 0 {
                    // trailer: skip to the empty line
                    while !self.buf.starts_with(b"\r\n") {
                        if let Some(i) = self.buf.windows(2).position(|w| w == b"\r\n") {
                            self.buf.drain(..i + 2);
                            continue;
                        }
                        if self.fill().await? == 0 {
                            break;
                        }
                    }
                    if self.buf.starts_with(b"\r\n") {
                        self.buf.drain(..2);
                    }
                    self.done = true;
                    return Ok(None);
                }
                self.chunk_left = size;
            },
        }
    }

    /// The whole remaining body.
    pub async fn body(&mut self) -> anyhow::Result<Vec<u8>> {
        let mut all = Vec::new();
        while let Some(b) = self.next_body().await? {
            all.extend(b);
        }
        Ok(all)
    }
}
