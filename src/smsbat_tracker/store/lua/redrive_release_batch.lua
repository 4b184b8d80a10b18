-- Put back a taken-over tick chain's claimed batch in its campaign's due set, due now,
-- at most `limit` messages a call (ReleaseBatch). A message no longer due (finished
-- meanwhile) stays out. Returns how many claimed messages are left to put back.
local campaign_due = KEYS[1]       -- the campaign's due set
local claimed = KEYS[2]            -- the messages the lost tick had claimed
local now = ARGV[1]                -- their new due time
local limit = tonumber(ARGV[2])    -- the most messages put back in this call
for _, id in ipairs(redis.call('SPOP', claimed, limit)) do
  redis.call('ZADD', campaign_due, 'XX', now, id)
end
return redis.call('SCARD', claimed)
