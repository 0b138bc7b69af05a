"""
Use dynllm from a Twisted program: no HTTP server of ours, just leases.

    python examples/lease.py CONFIG MODEL "Hello!"

dynllm starts MODEL's backend if needed (evicting idle models to stay within
the memory budget), hands back a lease on the running server, and keeps the
model loaded until the lease is released.
"""

import sys

from twisted.internet import defer, task

from dynllm import loadConfig, makeService


async def main(reactor, configPath, model, prompt):
    service = makeService(loadConfig(configPath), reactor, listen=False, persist=False)
    service.startService()
    try:
        lease = await service.manager.acquire(model)
        try:
            response = await service.http.post(
                lease.baseURL + "/v1/chat/completions",
                json={"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": 8},
                headers=lease.upstreamHeaders,  # the backend's key
            )
            reply = await response.json()
        finally:
            lease.release()
        print(f"{model} on {lease.baseURL} said: {reply['choices'][0]['message']['content']!r}")
    finally:
        await service.stopService()


if __name__ == "__main__":
    task.react(lambda reactor, *args: defer.ensureDeferred(main(reactor, *args)), sys.argv[1:])
