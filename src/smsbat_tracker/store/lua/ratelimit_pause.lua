-- Stop every caller for a while after a 429 (RateLimiter.pause).
local bucket, pause_key = KEYS[1], KEYS[2]
local ms = tonumber(ARGV[1])
--! include lib/adjust.lua
return pause({bucket, pause_key}, ms)
