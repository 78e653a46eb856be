#!/usr/bin/env python3
"""A real gRPC server and client (grpcio) for remora's Service tests; no .proto, bytes in and out.

  grpc_echo.py serve HOST:PORT NAME
      answers every call of /remora.test.Echo/Who with NAME; prints "serving" once listening.
  grpc_echo.py call HOST:PORT REQUESTS IN_FLIGHT
      makes REQUESTS unary calls on one channel (one HTTP/2 connection), IN_FLIGHT at a time,
      then prints {"answers": {NAME: count}, "failures": [text, ...]} as one JSON line.
      Each call is bounded (5 s) and so is the whole run (60 s).
"""
import json
import sys
import threading
import time
from concurrent import futures

import grpc

SERVICE = "remora.test.Echo"
METHOD = f"/{SERVICE}/Who"
CALL_TIMEOUT = 5.0
RUN_TIMEOUT = 60.0
# No proxy from the environment: the call must go where the test sends it.
OPTIONS = [("grpc.enable_http_proxy", 0)]


def serve(addr, name):
    answer = name.encode()
    handler = grpc.method_handlers_generic_handler(
        SERVICE, {"Who": grpc.unary_unary_rpc_method_handler(lambda request, context: answer)}
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16), handlers=[handler],
                         options=OPTIONS)
    if server.add_insecure_port(addr) == 0:
        sys.exit(f"cannot listen on {addr}")
    server.start()
    print("serving", flush=True)
    server.wait_for_termination()


def call(target, requests, in_flight):
    channel = grpc.insecure_channel(f"ipv4:{target}", options=OPTIONS)
    who = channel.unary_unary(METHOD)
    answers, failures = {}, []
    lock = threading.Lock()
    next_call = [0]
    deadline = time.monotonic() + RUN_TIMEOUT

    def worker():
        while time.monotonic() < deadline:
            with lock:
                if next_call[0] >= requests:
                    return
                next_call[0] += 1
            try:
                name = who(b"who", timeout=CALL_TIMEOUT).decode()
                with lock:
                    answers[name] = answers.get(name, 0) + 1
            except grpc.RpcError as error:
                with lock:
                    failures.append(f"{error.code()}: {error.details()}")

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(in_flight)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()) + CALL_TIMEOUT)
    with lock:
        missing = requests - sum(answers.values()) - len(failures)
        if missing > 0:
            failures.append(f"{missing} calls not made within {RUN_TIMEOUT} s")
        print(json.dumps({"answers": answers, "failures": failures}), flush=True)
    channel.close()


def main():
    if len(sys.argv) == 4 and sys.argv[1] == "serve":
        serve(sys.argv[2], sys.argv[3])
    elif len(sys.argv) == 5 and sys.argv[1] == "call":
        call(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
