-- Undoes a registration whose task was never published (Sessions.abandon): drops the
-- session while owner still owns it, and the subscription.
-- Returns DROPPED when the session was dropped, KEPT when another owner holds it (or none).
local session = KEYS[1]            -- the tracking's session
local subs = KEYS[2]               -- its subscriptions
local owner = ARGV[1]              -- the task id that registered it
local subscription = ARGV[2]       -- the subscription's id, '' for none
local KEPT, DROPPED = 0, 1
local dropped = KEPT
if redis.call('HGET', session, 'owner') == owner then
  redis.call('DEL', session)
  dropped = DROPPED
end
if subscription ~= '' then redis.call('HDEL', subs, subscription) end
return dropped
