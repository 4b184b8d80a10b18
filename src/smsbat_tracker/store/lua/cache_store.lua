-- Cache one status unless the cached one is final or newer (StatusCache.store).
-- Returns 1 when stored, 0 when not.
local status_key = KEYS[1]
local body = ARGV[1]               -- the provider's status body, JSON
local final = ARGV[2]              -- '1' for a final status
local status_time = ARGV[3]        -- the status's time: the provider's ts, or observed_at
local ttl_ms = ARGV[4]             -- kept this long while in flight
local final_ttl_ms = ARGV[5]       -- kept this long once final
local observed_at = ARGV[6]
local source = ARGV[7]             -- 'poll' or 'push'
local ts = ARGV[8]                 -- the provider's own timestamp, or ''
local history_length = ARGV[9]
local deliverystatus = ARGV[10]
--! include lib/status.lua
return store({status_key}, {
  body, final, status_time, ttl_ms, final_ttl_ms, observed_at, source, ts, history_length,
  deliverystatus,
})
