"""The load generator: throughput, latency and what the tier costs its host.

It drives a tier the way a scheduler does (submit jobs, poll
``get_finished()``, do its own pure-Python work for a short slice, repeat),
optionally side by side with the same workload on the thread engine
(``--compare threads``: the vLLM-style baseline) and with plain
``os.pwrite``/``os.preadv`` loops over the same kind of files with no tier
(``--compare raw``: the disk's reachable ceiling)::

    mp-tier bench                                # the default run, about a minute
    mp-tier bench --workload store,load --sweep block_size=256k,2m --compare threads,raw
    python -m mp_tier bench --sweep workers=1,2,4 --plot workers.png --json workers.json

Workloads
    store   fresh keys, ``--inflight`` jobs of ``--blocks-per-job`` blocks kept in flight.
    load    promotions of keys stored beforehand: ``cold`` (page cache dropped
            first) then ``warm`` (the same loads again).
    mixed   ``flood``: a store flood plus a trickle of loads (one at a time,
            ``--load-gap-ms`` after the previous one finished); ``idle-loads``:
            the same loads with no flood, the baseline for their latency.
    trace   multi-turn chats: Zipf-popular conversations come back with a longer
            prefix; each request looks up its prompt's keys, loads the leading
            hits and stores the misses.

Units: GB = 1e9 bytes; sizes given on the command line (256k, 2m, 1g) are binary.
The ``--json`` schema is documented in :mod:`mp_tier.bench.report`.

Modules, each depending only on those above it::

    units, errors, keys, progress, page_cache, records   parsing; small parts; the figures
    driver       the scheduler stand-in: Spinner, Host, Window (uses mp_tier's public API only)
    case         one point of a sweep and its engine order
    tier_runs    a measured run on a fresh tier
    raw          the same I/O with no tier
    chat_trace   the trace workload's requests
    workloads    store, load, mixed, trace
    root_dir     the run's directory under --root, guarded
    report, plot the table, the JSON document, the figure
    cli          the command line

tools/vllm_bench.py (vLLM 0.33's FS tier, C and Python I/O paths, against
mp_tier's default config) uses these, in the same order::

    vllm_targets issue 18's targets, judged from per-round figures (pure)
    vllm_table   its Markdown rows and target lines (pure)
    vllm_peer    the tiers opened through vLLM's own interface
    vllm_phase   one measured phase, driven as vLLM's scheduler drives a tier
    vllm_matrix  staging, the rounds of every column per job shape, the raw loops
    vllm_report  runs -> figures -> the printed tables and the JSON parts

``import mp_tier`` does not import this package; tqdm (the ``bench`` extra)
and matplotlib (the ``plot`` extra) are imported only when a bar or a plot is drawn.
"""
