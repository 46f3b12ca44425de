#!/usr/bin/env python3
"""Loads uturn's status page (GET / on the admin endpoint) in headless Chromium while traffic
flows, checks its numbers against /metrics, and takes a screenshot (stdlib only).

Chromium is started and driven over the DevTools pipe exactly as browser_call.py does (same
flags: nothing is downloaded, every name but localhost and the given IPs fails to resolve).

Checks, each printed as a failure sentence when it fails:
  * the page opened as http://ADMIN/#token=T (the token in the fragment, as docs/operations.md
    says) shows its data, and the token is gone from the address bar afterwards;
  * the same page in a fresh tab without the token shows the token form and no numbers;
  * the counts on the page, read after a refresh taken between two /metrics scrapes, lie
    between the two scrapes: allocations, permissions, channels (gauges) and packets relayed
    each way and no_permission drops (counters), and packets did flow (after > before > 0);
  * the sessions table lists --expect-sessions live sessions or more, and the timeline of the
    session given by --ended-user (ended) shows allocate, permission, channel, refresh and end
    with its reason and traffic; the live session of --html-user shows its CreatePermission 403;
  * a user name given by --html-user shows as text and injects no element.
Then it writes a full-page PNG to --screenshot, and prints "status page: ok" when all passed
(exit 0) or the failures (exit 1).
"""

import argparse
import base64
import json
import os
import shutil
import sys
import tempfile
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from browser_call import CDPError, launch_chromium, stop_browser  # noqa: E402


def scrape(url):
    with urllib.request.urlopen(url, timeout=5) as r:
        return r.read().decode()


def metric_sum(text, name, filt=""):
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and filt in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def evaluate(cdp, session, expr, timeout=10.0):
    r = cdp.call("Runtime.evaluate", {"expression": expr, "returnByValue": True, "awaitPromise": True},
                 session=session, timeout=timeout)
    if "exceptionDetails" in r:
        raise CDPError(f"{expr[:60]}: {json.dumps(r['exceptionDetails'])[:400]}")
    return r["result"].get("value")


def open_tab(cdp, url, width=1280, height=900):
    target = cdp.call("Target.createTarget", {"url": "about:blank"})["targetId"]
    session = cdp.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
    cdp.call("Runtime.enable", session=session)
    cdp.call("Page.enable", session=session)
    cdp.call("Emulation.setDeviceMetricsOverride",
             {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False}, session=session)
    cdp.call("Page.navigate", {"url": url}, session=session)
    return session


def wait_for(cdp, session, expr, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if evaluate(cdp, session, expr):
                return True
        except CDPError:
            pass
        time.sleep(0.2)
    return False


READ_PAGE = """(() => {
  const m = {};
  for (const e of document.querySelectorAll('[data-metric]')) m[e.dataset.metric] = Number(e.dataset.value);
  const drops = {};
  for (const e of document.querySelectorAll('#drops tr[data-reason]')) drops[e.dataset.reason] = Number(e.lastChild.dataset.value);
  const rows = [...document.querySelectorAll('#sessions tr.row')].map(r => ({
    id: Number(r.dataset.session), cells: [...r.cells].map(c => c.textContent), ended: r.classList.contains('ended'),
    elements: r.querySelectorAll('*').length - r.cells.length }));
  return { metrics: m, drops, rows, hash: location.hash, charts: document.querySelectorAll('#charts svg polyline').length,
           node: document.getElementById('node').textContent };
})()"""


def check_page(cdp, session, args, fails):
    # Workers publish their counters every 250 ms: the scrapes are 400 ms either side of the
    # page's refresh so that traffic shows between them.
    before = scrape(args.metrics)
    time.sleep(0.4)
    if not evaluate(cdp, session, "uturnStatus.refresh()", timeout=10):
        fails.append("the page's refresh failed")
    page = evaluate(cdp, session, READ_PAGE)
    time.sleep(0.4)
    after = scrape(args.metrics)
    print("page:", json.dumps({k: page[k] for k in ("metrics", "drops", "hash", "charts")}), flush=True)
    m = page["metrics"]
    checks = [
        ("allocations", "uturn_allocations", ""),
        ("permissions", "uturn_permissions", ""),
        ("channels", "uturn_channels", ""),
        ("packets_to_peer", "uturn_packets_relayed_total", 'direction="to_peer"'),
        ("packets_to_client", "uturn_packets_relayed_total", 'direction="to_client"'),
    ]
    for key, name, filt in checks:
        lo, hi = sorted((metric_sum(before, name, filt), metric_sum(after, name, filt)))
        v = m.get(key)
        print(f"{key}: /metrics before {lo:.0f}, page {v}, /metrics after {hi:.0f}", flush=True)
        if v is None or not lo <= v <= hi:
            fails.append(f"{key}: page shows {v}, /metrics {lo:.0f}..{hi:.0f}")
    lo, hi = sorted((metric_sum(before, "uturn_drops_total", 'reason="no_permission"'),
                     metric_sum(after, "uturn_drops_total", 'reason="no_permission"')))
    v = page["drops"].get("no_permission")
    print(f"no_permission drops: /metrics before {lo:.0f}, page {v}, /metrics after {hi:.0f}", flush=True)
    if v is None or not lo <= v <= hi or v == 0:
        fails.append(f"no_permission drops: page shows {v}, /metrics {lo:.0f}..{hi:.0f}")
    p0 = metric_sum(before, "uturn_packets_relayed_total")
    p1 = metric_sum(after, "uturn_packets_relayed_total")
    if not 0 < p0 < p1:
        fails.append(f"no traffic flowing: packets relayed {p0:.0f} then {p1:.0f}")
    if m.get("allocations", 0) < args.expect_sessions:
        fails.append(f"allocations {m.get('allocations')} < {args.expect_sessions}")
    if page["hash"]:
        fails.append(f"the token stayed in the address bar: {page['hash']!r}")
    if page["charts"] < 2:
        fails.append(f"{page['charts']} chart lines drawn")
    live = [r for r in page["rows"] if not r["ended"]]
    if len(live) < args.expect_sessions:
        fails.append(f"{len(live)} live sessions in the table, expected {args.expect_sessions}")
    if args.html_user:
        rows = [r for r in page["rows"] if args.html_user in r["cells"]]
        if not rows:
            fails.append(f"user {args.html_user!r} not shown as text")
        if any(r["elements"] for r in page["rows"]):
            fails.append("a session row holds an element: markup from a user name was injected")
    return page


def check_timeline(cdp, session, page, args, fails):
    ended = [r for r in page["rows"] if r["ended"] and args.ended_user in r["cells"]]
    if not ended:
        fails.append(f"no ended session of {args.ended_user!r} in the table")
        return
    sid = ended[0]["id"]
    kinds = evaluate(cdp, session, f"""(async () => {{ await uturnStatus.expand({sid});
        return [...document.querySelectorAll('tr[data-timeline="{sid}"] li')].map(li => li.dataset.kind); }})()""")
    print(f"timeline of session {sid}: {kinds}", flush=True)
    for k in ("allocate", "permission", "channel", "refresh", "end"):
        if k not in (kinds or []):
            fails.append(f"timeline of session {sid} has no {k} event: {kinds}")
    text = evaluate(cdp, session, f"document.querySelector('tr[data-timeline=\"{sid}\"]').textContent")
    if "deleted" not in text or "pkts" not in text:
        fails.append(f"timeline end of session {sid} lacks its reason or traffic: {text[:300]!r}")
    # A live session's timeline too: the one of --html-user holds a 403 (a peer the policy
    # denies), told with its meaning.
    live = [r for r in page["rows"] if not r["ended"]]
    mine = [r for r in live if args.html_user and args.html_user in r["cells"]]
    for r in (mine or live)[:1]:
        sid = r["id"]
        evaluate(cdp, session, f"uturnStatus.expand({sid})")
        text = evaluate(cdp, session, f"document.querySelector('tr[data-timeline=\"{sid}\"]').textContent")
        print(f"timeline of live session {sid}: {text[:400]!r}", flush=True)
        if mine and "CreatePermission: 403 forbidden" not in text:
            fails.append(f"the 403 on session {sid} is not on its timeline: {text[:400]!r}")


def screenshot(cdp, session, path):
    height = evaluate(cdp, session, "document.documentElement.scrollHeight")
    cdp.call("Emulation.setDeviceMetricsOverride",
             {"width": 1280, "height": min(int(height), 6000), "deviceScaleFactor": 1, "mobile": False},
             session=session)
    time.sleep(0.3)
    shot = cdp.call("Page.captureScreenshot", {"format": "png"}, session=session, timeout=15)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "wb") as f:
        f.write(base64.b64decode(shot["data"]))
    print(f"screenshot: {path} ({os.path.getsize(path)} bytes, 1280x{min(int(height), 6000)})", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--admin", required=True, help="admin endpoint, http://IP:PORT")
    ap.add_argument("--token", required=True)
    ap.add_argument("--metrics", required=True, help="metrics URL, http://IP:PORT/metrics")
    ap.add_argument("--expect-sessions", type=int, default=1)
    ap.add_argument("--ended-user", default="demo")
    ap.add_argument("--html-user")
    ap.add_argument("--screenshot", required=True)
    ap.add_argument("--chromium")
    args = ap.parse_args()
    binary = args.chromium or next((b for b in ("/usr/lib/chromium/chromium", "/usr/bin/chromium")
                                    if os.access(b, os.X_OK)), None)
    if not binary:
        sys.exit("no Chromium found (apt-get install chromium)")
    host = args.admin.split("//", 1)[1].rsplit(":", 1)[0]
    tmp = tempfile.mkdtemp(prefix="status_page.")
    proc = cdp = None
    fails = []
    try:
        with open(os.path.join(tmp, "chromium.stderr"), "wb") as stderr:
            proc, cdp = launch_chromium(binary, os.path.join(tmp, "profile"), None, stderr, [host])
        session = open_tab(cdp, f"{args.admin}/#token={args.token}")
        if not wait_for(cdp, session, "document.body && document.body.dataset.ready === '1'", 20):
            fails.append("the page did not show its data within 20 s")
        else:
            page = check_page(cdp, session, args, fails)
            check_timeline(cdp, session, page, args, fails)
            time.sleep(0.5)
            screenshot(cdp, session, args.screenshot)
        bare = open_tab(cdp, f"{args.admin}/")
        if not wait_for(cdp, bare, "!document.getElementById('login').hidden", 10):
            fails.append("without the token the page did not ask for it")
        shown = evaluate(cdp, bare, "[...document.querySelectorAll('[data-metric]')].filter(e => e.dataset.value).length")
        if shown:
            fails.append(f"without the token the page shows {shown} numbers")
    except (CDPError, OSError) as e:
        fails.append(f"setup: {e}")
    finally:
        if proc is not None:
            stop_browser(proc, cdp)
        shutil.rmtree(tmp, ignore_errors=True)
    if fails:
        print("status page: FAILED:\n  " + "\n  ".join(fails), flush=True)
        sys.exit(1)
    print("status page: ok", flush=True)


if __name__ == "__main__":
    main()
