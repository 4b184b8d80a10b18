-- Put back a taken-over tick chain's claimed batch in its campaign's due set, each message
-- at the time it fell due (its place in the rate limit's line), at most `limit` messages a
-- call (ReleaseBatch). A message no longer due (finished meanwhile) stays out. Returns how
-- many claimed messages are left to put back.
local campaign_due = KEYS[1]       -- the campaign's due set
local claimed = KEYS[2]            -- the messages the lost tick had claimed, by due time
local now = ARGV[1]                -- the due time of a batch noted without due times
local limit = tonumber(ARGV[2])    -- the most messages put back in this call
--! include lib/put_back.lua
return put_back(campaign_due, claimed, now, limit)
