-- Cache one status unless the cached one is final or newer (StatusCache.store), or, when
-- the outcome key is given (a push), the message's outcome is recorded: its tracking is
-- over, and what it ended with stands.
-- Returns 1 when stored, 0 when not.
local status_key = KEYS[1]
local outcome_key = KEYS[2]        -- the message's recorded outcome, or absent
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
if outcome_key and redis.call('EXISTS', outcome_key) == 1 then return 0 end
return store({status_key}, {
  body, final, status_time, ttl_ms, final_ttl_ms, observed_at, source, ts, history_length,
  deliverystatus,
})
