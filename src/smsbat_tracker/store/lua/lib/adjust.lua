-- K: as reserve's (K[1] bucket, K[2] pause).
-- unreserve(K, interval, n) gives back n tokens a caller booked and did not use
-- (interval: the emission interval, us).
-- pause(K, ms) stops every caller for ms (returns 1), unless a pause began less than
-- SPACING times its length ago (returns 0).
-- PAUSE_SPACING in store/ratelimit.py (a test checks that they agree).
local SPACING = 4
local function unreserve(K, interval, n)
  local ttl = redis.call('PTTL', K[1])
  local tat = tonumber(redis.call('GET', K[1]))
  if tat and ttl > 0 then
    redis.call('SET', K[1], string.format('%d', tat - interval * n), 'PX', ttl)
  end
end
local function pause(K, ms)
  if ms <= 0 then return 0 end
  local t = redis.call('TIME')
  local ends = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + ms
  if redis.call('SET', K[2], string.format('%d', ends), 'PX', SPACING * ms, 'NX') then
    return 1
  end
  return 0
end
