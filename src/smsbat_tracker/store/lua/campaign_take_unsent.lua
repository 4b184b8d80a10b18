-- Take a per-message callback to send (CampaignRunner's send), unless another tick took it
-- since this one read its stamp. Returns TAKEN or GONE.
local unsent_key = KEYS[1]         -- per message: when its callback was taken (ms)
local message_id = ARGV[1]
local stamp = ARGV[2]              -- the stamp its sender read
local new_stamp = ARGV[3]          -- now, ms
local TAKEN, GONE = 1, 0

if redis.call('HGET', unsent_key, message_id) ~= stamp then return GONE end
redis.call('HSET', unsent_key, message_id, new_stamp)
return TAKEN
