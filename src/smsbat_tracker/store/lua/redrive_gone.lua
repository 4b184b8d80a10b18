-- Declare gone the holders whose connections closed (Gone): each named in ARGV that last
-- beat at least gone_after ago and no earlier than since, both on this server's clock.
-- A holder declared gone gets holders score 0 (dead to every sweep from now on, and what
-- its own next beat finds should it be alive after all) and leaves the beats set.
-- Returns the holders declared gone.
local holders = KEYS[1]            -- holder -> its last beat (the worker's wall clock)
local beats = KEYS[2]              -- holder -> its last beat (the server's clock)
local gone_after = tonumber(ARGV[1])  -- seconds without a beat
local since = tonumber(ARGV[2])    -- no earlier beat counts (the caller's last outage)
local FIRST_HOLDER = 3             -- ARGV[3..]: holders with no connection left
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local gone = {}
for i = FIRST_HOLDER, #ARGV do
  local holder = ARGV[i]
  local beat = tonumber(redis.call('ZSCORE', beats, holder))
  if beat and beat >= since and now - beat >= gone_after
      and redis.call('ZSCORE', holders, holder) then
    redis.call('ZADD', holders, 0, holder)
    redis.call('ZREM', beats, holder)
    gone[#gone + 1] = holder
  end
end
return gone
