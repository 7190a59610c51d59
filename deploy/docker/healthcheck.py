"""Container health check with the standard library only: the slim images carry no curl.

    python /usr/local/lib/proxymq/healthcheck.py /readyz --port 9081 --port-env PROXYMQ_ADMIN_PORT

GETs http://127.0.0.1:PORT/PATH and exits 0 on a 2xx answer, 1 otherwise (a 503 from `/readyz`
included), so Docker's HEALTHCHECK, compose's `service_healthy` and a Kubernetes exec probe all
read the same answer. The port follows the container's own `PROXYMQ_*` variable when it is set,
so moving a port in the environment does not silently break the check. It never goes through
an HTTP proxy: `http_proxy` in the container (Docker's client proxy settings put it there,
usually with `no_proxy=localhost`, which does not cover 127.0.0.1) would send the check of
this container's own port to the proxy, and fail it.
"""

from __future__ import annotations

import argparse
import os
import sys
import urllib.error
import urllib.request


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("path", help="path to GET, e.g. /readyz")
    parser.add_argument("--port", type=int, required=True, help="port when --port-env is unset")
    parser.add_argument("--port-env", help="environment variable that may override the port")
    parser.add_argument("--timeout", type=float, default=2.0, help="seconds to wait")
    args = parser.parse_args(argv)
    port = int(os.environ.get(args.port_env, args.port)) if args.port_env else args.port
    url = f"http://127.0.0.1:{port}{args.path}"
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with direct.open(url, timeout=args.timeout) as response:
            status = int(response.status)
    except urllib.error.HTTPError as exc:
        print(f"{url}: {exc.code} {exc.read()[:200]!r}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"{url}: {exc}", file=sys.stderr)
        return 1
    return 0 if 200 <= status < 300 else 1


if __name__ == "__main__":
    sys.exit(main())
