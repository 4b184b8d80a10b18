-- Claim the dispatch of a campaign's report (CampaignRunner's report dispatch).
-- Returns CLAIMED; RECLAIMED when taken over from a sender that stopped (it may have sent
-- it); HELD when the report is sent or freshly claimed by another; RETIRED when it is sent
-- and no callback is left unsent: the campaign's chains then leave the due index.
local meta_key = KEYS[1]           -- the campaign hash ('report_sent': claim ms, or 'sent')
local unsent_key = KEYS[2]         -- per message: callbacks taken and not confirmed
local due_index = KEYS[3]          -- the due index the re-driver reads
local now_ms = ARGV[1]            -- now, ms
local stale_ms = tonumber(ARGV[2]) -- a claim older than this was left by a sender that stopped
local chains = tonumber(ARGV[3])   -- how many chains
local MEMBERS_AT = 4               -- ARGV[MEMBERS_AT + i - 1]: chain i's due index member
local HELD, CLAIMED, RETIRED, RECLAIMED = 0, 1, 2, 3

local mark = redis.call('HGET', meta_key, 'report_sent')
if not mark then
  redis.call('HSET', meta_key, 'report_sent', now_ms)
  return CLAIMED
end
if mark ~= 'sent' and tonumber(now_ms) - tonumber(mark) > stale_ms then
  redis.call('HSET', meta_key, 'report_sent', now_ms)
  return RECLAIMED
end
if mark == 'sent' and redis.call('HLEN', unsent_key) == 0 then
  for i = 1, chains do redis.call('ZREM', due_index, ARGV[MEMBERS_AT + i - 1]) end
  return RETIRED
end
return HELD
