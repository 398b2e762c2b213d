-- bench/zero_downtime.py's wrk script: at the end, one line "ZD_JSON {...}" with wrk's own counters and
-- latency percentiles in microseconds (wrk --latency prints p50/75/90/99 only, rounded). No request() or
-- response() hook: those would make wrk parse every response in Lua and slow it down.
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'ZD_JSON {"requests":%d,"duration_us":%d,"bytes":%d,"connect":%d,"read":%d,"write":%d,"status":%d,' ..
    '"timeout":%d,"mean_us":%.1f,"stdev_us":%.1f,"p50_us":%d,"p90_us":%d,"p99_us":%d,"p999_us":%d,' ..
    '"max_us":%d}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status, e.timeout,
    latency.mean, latency.stdev, latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9), latency.max))
end
