#!/usr/bin/env python3
"""N proxies asking remora-control for their workload certificates at once: the certificate
issuance figure of `make bench` (BENCH_PARTS=issuance), run by bench.py inside a network
namespace next to remora-control.

Each simulated proxy has a P-256 key of its own, a PKCS#10 request for it, its own token and
its own gRPC connection (as each proxy has its own channel to the control plane). The keys,
requests and connections are made first and not timed; then every proxy sends
`remora.identity.v1.Identity/Certify` at the same moment, and the figure is the time from that
moment until the last certificate arrived. Every answer is checked: the identity the token
names, a leaf for this proxy's own key carrying that identity as its URI SAN, trust anchors,
an expiry in the future. Prints one JSON object.

Needs grpcio and cryptography (Python). The two messages are encoded by hand (the proto file is
control/proto/remora/identity/v1/identity.proto): no generated stubs, no grpcio-tools.

  certify_burst.py --target 127.0.0.1:8090 --tokens tokens.csv [--count 1000]
  (tokens.csv: kube-apiserver's static token file, `token,system:serviceaccount:NS:SA,uid`,
  one line per proxy; the proxy's namespace and pod are sent as NS and `<SA>-pod`.)
"""

import argparse
import asyncio
import json
import resource
import statistics
import sys
import time

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

METHOD = "/remora.identity.v1.Identity/Certify"


def varint(n):
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def field(number, data):
    """A length-delimited protobuf field (string or bytes)."""
    return varint(number << 3 | 2) + varint(len(data)) + data


def certify_request(token, csr, namespace, pod):
    return field(1, token.encode()) + field(2, csr) + field(3, namespace.encode()) \
        + field(4, pod.encode())


def read_varint(data, at):
    shift = value = 0
    while True:
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, at


def certify_response(data):
    """CertifyResponse as a dict: identity, certificate_chain, trust_anchors, expires."""
    out = {"identity": "", "certificate_chain": [], "trust_anchors": [], "expires": 0}
    at = 0
    while at < len(data):
        key, at = read_varint(data, at)
        number, kind = key >> 3, key & 7
        if kind == 0:
            value, at = read_varint(data, at)
            if number == 4:
                out["expires"] = value
        elif kind == 2:
            length, at = read_varint(data, at)
            value, at = data[at:at + length], at + length
            if number == 1:
                out["identity"] = value.decode()
            elif number == 2:
                out["certificate_chain"].append(value)
            elif number == 3:
                out["trust_anchors"].append(value)
        else:
            raise ValueError(f"unexpected wire type {kind} for field {number}")
    return out


def read_tokens(path, count):
    """(token, namespace, serviceaccount) for the first `count` lines of a static token file."""
    proxies = []
    with open(path) as f:
        for line in f:
            token, user, *_ = line.strip().split(",")
            prefix = "system:serviceaccount:"
            if not user.startswith(prefix):
                continue
            namespace, sa = user[len(prefix):].split(":", 1)
            proxies.append((token, namespace, sa))
    if len(proxies) < count:
        sys.exit(f"{path}: {len(proxies)} ServiceAccount tokens, {count} needed")
    return proxies[:count]


def check(answer, key, identity, now):
    """What is wrong with one answer, or None."""
    if answer["identity"] != identity:
        return f"identity {answer['identity']!r}, expected {identity!r}"
    if not answer["certificate_chain"] or not answer["trust_anchors"]:
        return "no certificate chain or no trust anchors"
    leaf = x509.load_der_x509_certificate(answer["certificate_chain"][0])
    ours = key.public_key().public_bytes(serialization.Encoding.DER,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)
    if leaf.public_key().public_bytes(serialization.Encoding.DER,
                                      serialization.PublicFormat.SubjectPublicKeyInfo) != ours:
        return "the leaf is not for this proxy's key"
    uris = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName) \
        .value.get_values_for_type(x509.UniformResourceIdentifier)
    if uris != [identity]:
        return f"the leaf's URI SANs are {uris}, expected [{identity!r}]"
    if answer["expires"] <= now:
        return f"expires {answer['expires']}, before now"
    return None


async def burst(args):
    proxies = read_tokens(args.tokens, args.count)
    t0 = time.perf_counter()
    keys, requests = [], []
    for i, (token, namespace, sa) in enumerate(proxies):
        key = ec.generate_private_key(ec.SECP256R1())
        csr = x509.CertificateSigningRequestBuilder().subject_name(
            x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"proxy-{i}")])
        ).sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)
        keys.append(key)
        requests.append(certify_request(token, csr, namespace, f"{sa}-pod-{i}"))
    keys_s = time.perf_counter() - t0

    # One channel (one HTTP/2 connection) per proxy, connected before the burst; a few at a
    # time, so that the accept queue, not the figure, is what a cold start would measure.
    t0 = time.perf_counter()
    channels = [grpc.aio.insecure_channel(args.target, options=[("grpc.use_local_subchannel_pool", 1)])
                for _ in proxies]
    gate = asyncio.Semaphore(100)

    async def connect(channel):
        async with gate:
            await asyncio.wait_for(channel.channel_ready(), timeout=30)

    await asyncio.gather(*(connect(c) for c in channels))
    connect_s = time.perf_counter() - t0
    calls = [c.unary_unary(METHOD, request_serializer=None, response_deserializer=None)
             for c in channels]

    async def ask(call, request):
        started = time.perf_counter()
        try:
            answer = await call(request, timeout=args.timeout)
            return time.perf_counter() - started, time.perf_counter(), answer, None
        except grpc.aio.AioRpcError as e:
            return time.perf_counter() - started, time.perf_counter(), None, \
                f"{e.code().name}: {e.details()}"

    start = time.perf_counter()
    results = await asyncio.gather(*(ask(call, req) for call, req in zip(calls, requests)))
    wall_s = max(done for _, done, _, _ in results) - start
    for channel in channels:
        await channel.close()

    now = int(time.time())
    errors, latencies = [], []
    for (latency, _, answer, error), key, (_, namespace, sa) in zip(results, keys, proxies):
        if error is None:
            try:
                error = check(certify_response(answer), key,
                              f"spiffe://{args.trust_domain}/ns/{namespace}/sa/{sa}", now)
            except ValueError as e:
                error = f"unreadable answer: {e}"
        if error:
            errors.append(error)
        else:
            latencies.append(latency * 1e3)
    latencies.sort()
    pick = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))] \
        if latencies else None
    return {
        "proxies": len(proxies), "certified": len(latencies), "errors": len(errors),
        "first_errors": sorted(set(errors))[:3],
        "all_certified_s": wall_s if not errors else None, "last_answer_s": wall_s,
        "p50_ms": statistics.median(latencies) if latencies else None,
        "p99_ms": pick(0.99), "max_ms": latencies[-1] if latencies else None,
        "keys_s": keys_s, "connect_s": connect_s,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", required=True, help="remora-control's gRPC address (plaintext)")
    parser.add_argument("--tokens", required=True, help="static token file, one line per proxy")
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--trust-domain", default="cluster.local")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per call")
    args = parser.parse_args()
    # A socket per proxy, and grpc's own descriptors: raise the soft limit as far as allowed.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, max(soft, 4 * args.count + 256)) if hard != resource.RLIM_INFINITY \
        else max(soft, 4 * args.count + 256)
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    print(json.dumps(asyncio.run(burst(args))))


if __name__ == "__main__":
    main()
