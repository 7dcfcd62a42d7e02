//! WebSocket through a sandbox's port: the upgrade is forwarded (without the
//! caller's key), the `101` relayed, and frames flow both ways; closing either
//! side, or killing the sandbox, closes the other. The server inside is a small
//! standard-library Python one; the client here speaks RFC 6455 by hand.

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use sandgate_client::Method;
use serde_json::json;

use crate::common::{PostJson, TestApp, jail_available};

/// Accepts connections on 127.0.0.1:8765, answers the handshake, sends one text
/// frame naming the path and the request's header names, then echoes text
/// frames; `bye` makes it close the connection without a close frame. What ends
/// each connection is appended to /workspace/ws.log.
const WS_SERVER: &str = r#"
import base64, hashlib, socket, struct, threading

GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

def log(line):
    with open("/workspace/ws.log", "a") as f:
        f.write(line + "\n")

def exact(c, n):
    b = b""
    while len(b) < n:
        chunk = c.recv(n - len(b))
        if not chunk:
            raise EOFError
        b += chunk
    return b

def read_frame(c):
    b0, b1 = exact(c, 2)
    n = b1 & 127
    if n == 126:
        n = struct.unpack(">H", exact(c, 2))[0]
    elif n == 127:
        n = struct.unpack(">Q", exact(c, 8))[0]
    mask = exact(c, 4) if b1 & 128 else b"\0\0\0\0"
    return b0 & 15, bytes(x ^ mask[i % 4] for i, x in enumerate(exact(c, n)))

def send_frame(c, op, data):
    n = len(data)
    head = bytes([0x80 | op]) + (bytes([n]) if n < 126 else bytes([126]) + struct.pack(">H", n))
    c.sendall(head + data)

def serve(c):
    req = b""
    while b"\r\n\r\n" not in req:
        chunk = c.recv(4096)
        if not chunk:
            return
        req += chunk
    lines = req.split(b"\r\n\r\n")[0].decode().split("\r\n")
    path = lines[0].split(" ")[1]
    headers = {k.strip().lower(): v.strip() for k, v in (l.split(":", 1) for l in lines[1:])}
    key = headers["sec-websocket-key"] + GUID
    accept = base64.b64encode(hashlib.sha1(key.encode()).digest()).decode()
    c.sendall(("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
               "Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + "\r\n\r\n").encode())
    send_frame(c, 1, (path + " " + ",".join(sorted(headers))).encode())
    try:
        while True:
            op, data = read_frame(c)
            if op == 8:
                send_frame(c, 8, data)
                log("close frame")
                break
            if data == b"bye":
                log("bye")
                break
            send_frame(c, 1, data)
    except (EOFError, ConnectionError):
        log("eof")
    c.close()

s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", 8765))
s.listen(8)
open("/workspace/ready", "w").close()
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"#;

/// The RFC 6455 example key and the accept value it must produce.
const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
const ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

struct Ws {
    stream: TcpStream,
}

impl Ws {
    /// Connects to sandgate and asks for an upgrade at `path`; the status line
    /// and headers of the answer, and the connection.
    fn connect(app: &TestApp, path: &str, key: &str) -> (String, Ws) {
        let addr = app.url.trim_start_matches("http://");
        let mut stream = TcpStream::connect(addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {key}\r\n\
             X-API-Key: {key}\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\n\
             Sec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).unwrap();
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            match stream.read(&mut byte) {
                Ok(1) => head.push(byte[0]),
                _ => break,
            }
        }
        (String::from_utf8_lossy(&head).into_owned(), Ws { stream })
    }

    /// Sends one masked frame, as a client must.
    fn send(&mut self, opcode: u8, payload: &[u8]) {
        assert!(payload.len() < 126);
        let mask = [0x12u8, 0x34, 0x56, 0x78];
        let mut frame = vec![0x80 | opcode, 0x80 | payload.len() as u8];
        frame.extend_from_slice(&mask);
        frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        self.stream.write_all(&frame).unwrap();
    }

    /// One frame from the server: (opcode, payload); `None` when the
    /// connection ended.
    fn receive(&mut self) -> Option<(u8, Vec<u8>)> {
        let mut head = [0u8; 2];
        read_all(&mut self.stream, &mut head)?;
        let mut len = u64::from(head[1] & 127);
        if len == 126 {
            let mut ext = [0u8; 2];
            read_all(&mut self.stream, &mut ext)?;
            len = u64::from(u16::from_be_bytes(ext));
        }
        assert_eq!(head[1] & 0x80, 0, "server frames are not masked");
        let mut payload = vec![0u8; len as usize];
        read_all(&mut self.stream, &mut payload)?;
        Some((head[0] & 15, payload))
    }

    /// Whether the connection ends (end of file or reset) before the read timeout.
    fn ends(&mut self) -> bool {
        let mut buf = [0u8; 64];
        loop {
            match self.stream.read(&mut buf) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(e) if e.kind() == ErrorKind::ConnectionReset => return true,
                Err(e) => panic!("the connection stayed open: {e}"),
            }
        }
    }
}

fn read_all(stream: &mut TcpStream, buf: &mut [u8]) -> Option<()> {
    match stream.read_exact(buf) {
        Ok(()) => Some(()),
        Err(e)
            if matches!(
                e.kind(),
                ErrorKind::UnexpectedEof | ErrorKind::ConnectionReset
            ) =>
        {
            None
        }
        Err(e) => panic!("reading a frame: {e}"),
    }
}

fn text(frame: Option<(u8, Vec<u8>)>) -> String {
    let (opcode, payload) = frame.expect("a frame");
    assert_eq!(opcode, 1, "a text frame");
    String::from_utf8(payload).unwrap()
}

#[test]
fn websocket_connections_are_piped_into_the_sandbox_and_closed_together() {
    if !jail_available() {
        return;
    }
    let app = TestApp::start();
    let admin = app.admin();
    let key = app.key_with(&["sandbox:*"]);
    let client = app.client(&key);
    let r = client.post_json("/v1/sandboxes", &json!({}));
    assert_eq!(r.status, 201, "{}", r.text());
    let id = r.json()["id"].as_str().unwrap().to_owned();
    let file = |path: &str| {
        client
            .raw(
                Method::GET,
                &format!("/v1/sandboxes/{id}/files?path={path}"),
                &[],
                None,
            )
            .unwrap()
    };
    let put = client
        .raw(
            Method::PUT,
            &format!("/v1/sandboxes/{id}/files?path=/workspace/ws.py"),
            &[],
            Some(WS_SERVER.as_bytes()),
        )
        .unwrap();
    assert_eq!(put.status, 200);
    let r = client.post_json(
        &format!("/v1/sandboxes/{id}/exec"),
        &json!({"command": "nohup python3 /workspace/ws.py > /workspace/ws.err 2>&1 &"}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let r = client.post_json(&format!("/v1/sandboxes/{id}/ports"), &json!({"port": 8765}));
    assert_eq!(r.status, 200, "{}", r.text());
    let started = Instant::now();
    while file("/workspace/ready").status != 200 {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the server inside never listened: {}",
            file("/workspace/ws.err").text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let path = format!("/v1/sandboxes/{id}/ports/8765/chat?room=1");
    let log = || file("/workspace/ws.log").text();

    // The handshake goes through, and the program never sees the caller's key.
    let (head, mut ws) = Ws::connect(&app, &path, &key);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let lower = head.to_ascii_lowercase();
    assert!(
        lower.contains(&format!(
            "sec-websocket-accept: {}",
            ACCEPT.to_ascii_lowercase()
        )),
        "{head}"
    );
    assert!(lower.contains("upgrade: websocket"), "{head}");
    let seen = text(ws.receive());
    let (seen_path, seen_headers) = seen.split_once(' ').unwrap();
    assert_eq!(seen_path, "/chat?room=1");
    let seen_headers: Vec<&str> = seen_headers.split(',').collect();
    for wanted in [
        "upgrade",
        "connection",
        "sec-websocket-key",
        "sec-websocket-version",
    ] {
        assert!(seen_headers.contains(&wanted), "{seen}");
    }
    for secret in ["authorization", "x-api-key"] {
        assert!(
            !seen_headers.contains(&secret),
            "the caller's key leaked: {seen}"
        );
    }
    // Frames both ways, then a close handshake the program answers.
    ws.send(1, b"hello through sandgate");
    assert_eq!(text(ws.receive()), "hello through sandgate");
    ws.send(1, "ünïcode ✓".as_bytes());
    assert_eq!(text(ws.receive()), "ünïcode ✓");
    ws.send(8, &[0x03, 0xe8]);
    assert_eq!(ws.receive(), Some((8, vec![0x03, 0xe8])));
    assert!(ws.ends(), "the program closed: so does sandgate");

    // The program closes without a close frame: the caller's connection ends.
    let (head, mut ws) = Ws::connect(&app, &path, &key);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    text(ws.receive());
    ws.send(1, b"bye");
    assert!(ws.ends());

    // The caller goes away: the program's connection ends.
    let (head, mut ws) = Ws::connect(&app, &path, &key);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    text(ws.receive());
    drop(ws);
    let started = Instant::now();
    while !log().contains("eof") {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the program's connection stayed open: {}",
            log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(log(), "close frame\nbye\neof\n");

    // Without the scope the upgrade is refused before reaching the sandbox.
    let reader = app.key_with(&["sandbox:read"]);
    let (head, _) = Ws::connect(&app, &path, &reader);
    assert!(head.starts_with("HTTP/1.1 403"), "{head}");

    // Killing the sandbox ends a connection in progress.
    let (head, mut ws) = Ws::connect(&app, &path, &key);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    text(ws.receive());
    let r = admin
        .raw(Method::DELETE, &format!("/v1/sandboxes/{id}"), &[], None)
        .unwrap();
    assert_eq!(r.status, 204);
    assert!(ws.ends(), "the connection outlived its sandbox");
}
