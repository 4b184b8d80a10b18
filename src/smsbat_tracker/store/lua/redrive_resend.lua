-- Claim the sending again of a follow-up found lost (ClaimResend): only if its entry is
-- still the one the sweep read. A tracking run that sent it meanwhile (its claimer died,
-- and the re-driven run sends it again) wrote a fresh entry first: then the sweep leaves
-- it, and the follow-up goes out once.
-- Returns CLAIMED (the entry is now ARGV's, and the sweep sends it) or CHANGED.
local sends = KEYS[1]              -- the hash: task id -> how to send it again
local index = KEYS[2]              -- the unreceived index: task id -> when it was sent
local task_id = ARGV[1]
local read = ARGV[2]               -- the entry as the sweep read it
local entry = ARGV[3]              -- the entry to write (its count of sends raised)
local score = ARGV[4]              -- when it is sent again
local CLAIMED, CHANGED = 1, 0
if redis.call('HGET', sends, task_id) ~= read then
  return CHANGED
end
redis.call('HSET', sends, task_id, entry)
redis.call('ZADD', index, score, task_id)
return CLAIMED
