#!/usr/bin/env python3
"""Writes the fuzz targets' seed corpora from the project's own test data.

    fuzz/seeds.py            rewrites fuzz/corpus/<target>/ (committed)
    fuzz/seeds.py --peer DIR adds seeds made from other meshes' injector inputs in DIR to
                             fuzz/work/admission_review/ (not committed)

Sources: RFC 7541 Appendix C header blocks (the hpack tests), HTTP/2 frame sequences built from
them, the HTTP/1 responses in the proxy's tests, the injector's golden inputs as AdmissionReviews,
the flag lines of remora-init's golden files, and remora's own route manifests
(tests/data/gateway-extra.yaml) on the mesh tests' Services, ClientHellos and CSRs made by the
openssl command line (a local listener captures `openssl s_client`'s hellos). Needs python3 with
PyYAML (python3-yaml) and openssl. The hellos and CSRs hold fresh randoms and keys: each run
writes other files for them.
"""
import hashlib
import json
import os
import re
import socket
import struct
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FUZZ = os.path.join(ROOT, "fuzz")


def read(path):
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        return f.read()


def write(directory, data):
    """One seed, named by its content."""
    os.makedirs(directory, exist_ok=True)
    name = hashlib.sha1(data).hexdigest()[:16]
    with open(os.path.join(directory, name), "wb") as f:
        f.write(data)


def rust_bytes(literal):
    """The bytes of a Rust byte-string literal's body (escapes and line continuations)."""
    literal = re.sub(r"\\\n\s*", "", literal)
    out = bytearray()
    i = 0
    while i < len(literal):
        c = literal[i]
        if c != "\\":
            out += c.encode()
            i += 1
            continue
        e = literal[i + 1]
        if e == "x":
            out.append(int(literal[i + 2:i + 4], 16))
            i += 4
            continue
        out += {"r": b"\r", "n": b"\n", "t": b"\t", "0": b"\0", "\\": b"\\", '"': b'"', "'": b"'"}[e]
        i += 2
    return bytes(out)


def unhex(text):
    return bytes.fromhex("".join(text.split()))


# RFC 7541 C.3 and C.5: the same requests and responses as C.4 and C.6, without Huffman coding.
C3 = [
    "8286 8441 0f77 7777 2e65 7861 6d70 6c65 2e63 6f6d",
    "8286 84be 5808 6e6f 2d63 6163 6865",
    "8287 85bf 400a 6375 7374 6f6d 2d6b 6579 0c63 7573 746f 6d2d 7661 6c75 65",
]
C5 = [
    "3fe101 4803 3330 3258 0770 7269 7661 7465 611d 4d6f 6e2c 2032 3120 4f63 7420 3230 3133"
    " 2032 303a 3133 3a32 3120 474d 546e 1768 7474 7073 3a2f 2f77 7777 2e65 7861 6d70 6c65"
    " 2e63 6f6d",
    "4803 3330 37c1 c0bf",
    "88c1 611d 4d6f 6e2c 2032 3120 4f63 7420 3230 3133 2032 303a 3133 3a32 3220 474d 54c0"
    " 5a04 677a 6970 7738 666f 6f3d 4153 444a 4b48 514b 425a 584f 5157 454f 5049 5541 5851"
    " 5745 4f49 553b 206d 6178 2d61 6765 3d33 3630 303b 2076 6572 7369 6f6e 3d31",
]


def hpack_blocks():
    """(side, [blocks]) from RFC 7541 Appendix C: the hpack tests' C.4 and C.6, and C.3, C.5."""
    source = read("proxy/src/serve/hpack.rs")

    def strings(test):
        body = source[source.index(test):]
        body = body[:body.index("\n    }\n")]
        return [unhex(s) for s in re.findall(r'\(\s*"([0-9a-f ]+)"', body.replace("\n", " "))]

    c6 = strings("fn the_responses_of_rfc_7541_c6")[:3]
    c4 = strings("fn the_requests_of_rfc_7541_c4")
    assert len(c6) == 3 and len(c4) == 3, (c4, c6)
    status = ["4803 3330 37", "be", "0803 3530 33", "1803 3130 33", "0007 3a73 7461 7475 7303 3432 39",
              "0085 b884 8d36 a303 3230 31", "4001 7801 79", "20"]
    return [
        (1, [unhex(b) for b in C3]),
        (1, c4),
        (0, [unhex(b) for b in C5]),
        (0, c6),
        (0, [unhex(b) for b in status]),
        (1, c4 + [unhex("0004 686f 7374 0a74 6573 742e 6c6f 6361 6c")]),
    ]


def hpack_seeds(out):
    for side, blocks in hpack_blocks():
        data = bytes([side])
        for block in blocks:
            data += struct.pack(">H", len(block)) + block
        write(out, data)
        # Each block alone too.
        for block in blocks[:1]:
            write(out, bytes([side]) + struct.pack(">H", len(block)) + block)


PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def frame(kind, flags, stream, payload=b""):
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload


def h2_seeds(out):
    blocks = dict((side, []) for side in (0, 1))
    for side, bs in hpack_blocks()[:4]:
        blocks[side].append(bs)
    settings = frame(4, 0, 0, bytes.fromhex("000300000064000400010000"))
    ack = frame(4, 1, 0)
    conversations = []
    for requests, responses in zip(blocks[1], blocks[0]):
        client = PREFACE + settings + ack
        server = settings + ack
        for i, (req, resp) in enumerate(zip(requests, responses)):
            stream = 1 + 2 * i
            client += frame(1, 0x5, stream, req)
            server += frame(1, 0x4, stream, resp) + frame(0, 0x1, stream, b"hello")
        conversations.append((client, server))
    req, resp = blocks[1][0], blocks[0][1]
    # A request block over HEADERS and CONTINUATION; padded and prioritised HEADERS; a body.
    client = (PREFACE + settings + frame(1, 0x0, 1, req[0][:5]) + frame(9, 0x4, 1, req[0][5:])
              + frame(1, 0x8 | 0x20 | 0x4, 3, b"\x02" + b"\0\0\0\0\x10" + req[1] + b"\0\0")
              + frame(0, 0x1, 3, b"body") + frame(3, 0, 5, b"\0\0\0\x08"))
    server = (settings + frame(1, 0x0, 1, resp[0][:3]) + frame(9, 0x4, 1, resp[0][3:])
              + frame(5, 0x4, 1, b"\0\0\0\x02" + req[2]) + frame(1, 0x5, 3, resp[1])
              + frame(6, 0, 0, b"12345678") + frame(7, 0, 0, b"\0\0\0\x03\0\0\0\0"))
    conversations.append((client, server))
    # The garbage of the HTTP/2 tests: a HEADERS of 40 garbage bytes, a head claiming 16 MiB.
    garbage = frame(1, 5, 1, bytes(range(40))) + bytes([0xff, 0xff, 0xff, 1, 0, 0, 0, 0, 3])
    conversations.append((PREFACE + garbage, settings))
    conversations.append((PREFACE + b"\0\0\0\x04\0\0\0\0\0", garbage))
    for flags in (0, 1):
        for seed, (client, server) in enumerate(conversations):
            write(out, bytes([flags, seed * 37 % 256]) + struct.pack(">H", len(client)) + client + server)


def h1_seeds(out):
    responses = set()
    for path in ("proxy/src/http_tests.rs", "proxy/src/client/h1.rs", "proxy/src/serve/http.rs"):
        source = read(path)
        for literal in re.findall(r'b"(HTTP/1\.[01] (?:[^"\\]|\\.|\\\n)*)"', source, re.S):
            responses.add(rust_bytes(literal))
    responses.update([
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\ncontent-length: 3\r\n\r\n"
        b"3\r\nabc\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nconnection: x-hop, close\r\nx-hop: 1\r\ncontent-length: 5, 5\r\n\r\nhello",
        b"HTTP/1.0 200 OK\r\n\r\nuntil close",
        b"HTTP/1.1 304 Not Modified\r\ncontent-length: 10\r\n\r\n",
        b"HTTP/1.1 204 No Content\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
        b"5;ext=1\r\nhello\r\n1\r\n \r\n5\r\nworld\r\n0\r\nx-sum: 42\r\n\r\n",
    ])
    for i, response in enumerate(sorted(responses)):
        write(out, bytes([0, i * 41 % 256]) + response)
    write(out, bytes([1, 7]) + b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n")


def detect_seeds(out):
    for data in [PREFACE + frame(4, 0, 0), b"GET / HTTP/1.1\r\nhost: a\r\n\r\n", b"POST /x HTTP/1.1\r\n",
                 b"CONNECT a:443 HTTP/1.1\r\n", b"OPTIONS * HTTP/1.1\r\n", b"PRI * HTTP/1.1\r\n",
                 b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", b"SSH-2.0-OpenSSH_9.6\r\n",
                 b"*1\r\n$4\r\nPING\r\n", b"SET k v\r\n", b"HEAD / HTTP/1.0\r\n\r\n", b"G", b"PRI"]:
        write(out, data)


def review(pod, path_byte, namespace):
    body = {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": namespace,
            "operation": "CREATE",
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
            "object": pod,
            "dryRun": False,
        },
    }
    return bytes([path_byte]) + json.dumps(body, separators=(",", ":")).encode()


def pods_of(document):
    """The pods a manifest document holds: itself, its template, a List's items' ones."""
    if not isinstance(document, dict):
        return []
    if document.get("kind") == "List":
        return [pod for item in document.get("items") or [] for pod in pods_of(item)]
    if document.get("kind") == "Pod":
        return [document]
    spec = document.get("spec") or {}
    template = spec.get("template") or (spec.get("jobTemplate") or {}).get("spec", {}).get("template")
    if isinstance(template, dict) and isinstance(template.get("spec"), dict):
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": template.get("metadata") or {},
               "spec": template["spec"]}
        pod["metadata"].setdefault("generateName", (document.get("metadata") or {}).get("name", "x") + "-")
        return [pod]
    return []


def review_seeds(out, paths):
    import yaml
    for path in paths:
        try:
            with open(path, encoding="utf-8") as f:
                documents = list(yaml.safe_load_all(f))
        except (yaml.YAMLError, UnicodeDecodeError):
            continue
        for document in documents:
            for pod in pods_of(document):
                # The request's namespace: the pod's, else its workload's (the identity in
                # remora.io/status names it).
                namespace = ((pod.get("metadata") or {}).get("namespace")
                             or (document.get("metadata") or {}).get("namespace") or "default")
                try:
                    write(out, review(pod, 0, namespace))
                    write(out, review(pod, 2, namespace))
                except (TypeError, ValueError):
                    pass  # YAML that JSON cannot hold (dates as keys, say)


def init_seeds(out):
    golden = os.path.join(ROOT, "init-net/tests/golden")
    for name in sorted(os.listdir(golden)):
        first = read(os.path.join("init-net/tests/golden", name)).split("\n", 1)[0]
        if first.startswith("# remora-init"):
            args = first.split()[2:]
            write(out, ("0\n" + "\n".join(args)).encode())
    values = {
        "1": ["1337", "0", " 2000 ", "4294967295"],
        "2": ["15001", "65535", "0", "8080 "],
        "3": ["8080", "9000-9100", "5-4", " 1-65535"],
        "4": ["8081,9000-9100", "", "53, 5432-5433,", "80,,443"],
        "5": ["*", "80,8080-8090", "*,80"],
        "6": ["10.96.0.0/12,198.18.0.3/32,fd00::/8,2001:2::3", "10.1.2.3/8", "::ffff:1.2.3.4/128"],
        "7": ["*", "10.0.0.0/8,fd00::/8", "0.0.0.0/0", "fe80::1%eth0"],
    }
    for choice, items in values.items():
        for item in items:
            write(out, (choice + "\n" + item).encode())


ROUTE_SERVICES = """\
apiVersion: v1
kind: Service
metadata: {name: %(name)s, namespace: gateway-conformance-mesh}
spec:
  clusterIP: %(ip)s
  ports:
  - {name: http, port: 80, targetPort: 8080, appProtocol: http}
  - {name: grpc, port: 7070, targetPort: 7070, appProtocol: grpc}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: %(name)s-x1
  namespace: gateway-conformance-mesh
  labels: {kubernetes.io/service-name: %(name)s}
addressType: IPv4
ports:
- {name: http, port: 8080}
- {name: grpc, port: 7070}
endpoints:
- addresses: [%(pod)s]
  conditions: {ready: true}
"""

ROUTE_REQUESTS = [
    "GET /\n",
    "GET /v2/example?x=1&y=2\nx-canary: 1\nhost: echo\n",
    "POST /remora.conformance.Echo/Echo\ncontent-type: application/grpc\n",
    "PUT /prefix/one/two\nversion: two\nversion: one\n",
]


def routes_seeds(out):
    """The Services of the mesh tests, each route of remora's own route manifests attached, and
    a few requests."""
    base = "---\n".join(ROUTE_SERVICES % {"name": name, "ip": f"198.18.0.{100 + i}",
                                           "pod": f"198.18.0.{10 + i}"}
                         for i, name in enumerate(("echo", "echo-v1", "echo-v2")))
    documents = read("tests/data/gateway-extra.yaml").split("\n---\n")
    routes = [d for d in documents if re.search(r"^kind: (HTTP|GRPC)Route$", d, re.M)]
    for i, route in enumerate(routes):
        write(out, (base + "---\n" + route + "\n#request\n"
                    + ROUTE_REQUESTS[i % len(ROUTE_REQUESTS)]).encode())


def captured_hello(args):
    """The first bytes `openssl s_client ARGS` sends to a local listener: its ClientHello."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        listener.settimeout(10)
        port = listener.getsockname()[1]
        client = subprocess.Popen(["openssl", "s_client", "-connect", f"127.0.0.1:{port}"] + args,
                                  stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        try:
            connection, _ = listener.accept()
            with connection:
                connection.settimeout(5)
                data = b""
                # One TLS record: its 5-byte header says how long.
                while len(data) < 5 or len(data) < 5 + struct.unpack(">H", data[3:5])[0]:
                    more = connection.recv(65536)
                    if not more:
                        break
                    data += more
        finally:
            client.kill()
            client.wait()
    return data


HELLO_ARGS = [
    ["-tls1_3", "-alpn", "remora/1"],
    ["-tls1_3", "-alpn", "h2,remora/1,http/1.1", "-servername", "peer.test"],
    ["-tls1_3", "-alpn", "remora/2"],
    ["-tls1_3", "-alpn", "h2,http/1.1", "-servername", "example.com"],
    ["-tls1_3"],
    ["-tls1_2", "-alpn", "remora/1"],
    ["-tls1_2", "-noservername"],
    ["-tls1_3", "-alpn", "remora/1", "-groups", "P-256:P-384", "-sess_out", "/dev/null"],
]


def hello_seeds(out):
    """Input 0: hellos captured whole, cut, and with bytes after them; input 1: protocol lists
    for the target's own rustls hellos."""
    for i, args in enumerate(HELLO_ARGS):
        hello = captured_hello(args)
        assert hello[:1] == b"\x16", (args, hello[:16])
        write(out, b"\0" + hello)
        if i < 2:
            write(out, b"\0" + hello[:len(hello) // 2])
            write(out, b"\0" + hello[:5])
            write(out, b"\0" + hello + b"\x17\x03\x03\x00\x05hello")
            # The handshake message split over two records.
            body = hello[5:]
            write(out, b"\0" + b"\x16\x03\x01" + struct.pack(">H", 40) + body[:40]
                  + b"\x16\x03\x01" + struct.pack(">H", len(body) - 40) + body[40:])
    write(out, b"\0\x16\x03\x01\x00\x00")
    write(out, b"\0\x16\x03\x03\xff\xff" + bytes(64))
    for choice, protocols in [(1, []), (0, []), (0, [b"h2"]), (3, [b"h2", b"http/1.1"]),
                              (5, [b"remora/2", b"remora/"]), (0, [b"remora/1"])]:
        data = bytes([1, choice])
        for p in protocols:
            data += bytes([len(p) - 1]) + p
        write(out, data + b"\x01\x37")


def openssl(*args, data=None):
    return subprocess.run(["openssl", *args], input=data, capture_output=True, check=True).stdout


CSR_KEYS = [
    ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"],
    ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-384"],
    ["-newkey", "ed25519"],
    ["-newkey", "rsa:2048"],
    ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:secp256k1"],
]
CSR_SUBJECTS = [
    ["-subj", "/CN=proxy"],
    ["-subj", "/CN=admin/O=system:masters", "-addext",
     "subjectAltName=URI:spiffe://cluster.local/ns/kube-system/sa/admin,DNS:evil.example,IP:198.18.0.1"],
]

TOKEN_FILES = [
    "token-a,system:serviceaccount:default:client,uid-1\n"
    "token-b,system:serviceaccount:ns-2:server.v2,uid-2,\"group1,group2\"\n",
    "\n  \n\"tok,en\",\"system:serviceaccount:a:b\",\"u\"\"id\"\n",
    "t,system:serviceaccount:default:a/b,u\nt2,system:serviceaccount:Default:x,u\n"
    "t3,system:serviceaccount::x,u\nt4,admin,u\nt5,system:serviceaccount:a:b:c,u\n",
    "t,u\n",
    "t,system:serviceaccount:a:b,u\nt,system:serviceaccount:a:c,u\n",
    "\"open,system:serviceaccount:a:b,u\n",
]


def csr_seeds(out):
    """Input 0: CSRs, valid and broken; input 1: token files."""
    with tempfile.TemporaryDirectory() as tmp:
        for i, key in enumerate(CSR_KEYS):
            for subject in CSR_SUBJECTS[:1] if i > 1 else CSR_SUBJECTS:
                der = openssl("req", "-new", "-nodes", "-keyout", os.path.join(tmp, "key"),
                              "-outform", "DER", *key, *subject)
                write(out, b"\0" + der)
                if i == 0:
                    write(out, b"\0" + der[:len(der) // 2])
                    write(out, b"\0" + der + b"\0")
                    flipped = bytearray(der)
                    flipped[-3] ^= 1  # in the signature
                    write(out, b"\0" + bytes(flipped))
    write(out, b"\0")
    write(out, b"\0\x30\x80")
    for text in TOKEN_FILES:
        write(out, b"\1" + text.encode())


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "--peer":
        peer = sys.argv[2]
        paths = [os.path.join(d, f) for d, _, fs in os.walk(peer) for f in sorted(fs)
                 if f.endswith((".yaml", ".yml"))]
        review_seeds(os.path.join(FUZZ, "work/admission_review"), paths)
        return
    corpus = os.path.join(FUZZ, "corpus")
    for target in ("hpack_decode", "h2_relay_frames", "h1_response", "detect", "admission_review",
                   "init_flags", "routes", "client_hello", "identity_csr"):
        d = os.path.join(corpus, target)
        if os.path.isdir(d):
            for f in os.listdir(d):
                os.remove(os.path.join(d, f))
    hpack_seeds(os.path.join(corpus, "hpack_decode"))
    h2_seeds(os.path.join(corpus, "h2_relay_frames"))
    h1_seeds(os.path.join(corpus, "h1_response"))
    detect_seeds(os.path.join(corpus, "detect"))
    golden = os.path.join(ROOT, "injector/tests/golden")
    review_seeds(os.path.join(corpus, "admission_review"),
                 [os.path.join(golden, f) for f in sorted(os.listdir(golden)) if f.endswith(".in.yaml")])
    init_seeds(os.path.join(corpus, "init_flags"))
    routes_seeds(os.path.join(corpus, "routes"))
    hello_seeds(os.path.join(corpus, "client_hello"))
    csr_seeds(os.path.join(corpus, "identity_csr"))


if __name__ == "__main__":
    main()
