-- Gives back the claims of a dispatch that failed (Dispatcher.dispatch), so that the next
-- settle (a provider's retried push, the poller, the re-driver) takes them at once. Only
-- this claimer's claims: one another claimer took over stays.
-- Returns how many claims were given back.
local claims = KEYS[1]             -- the message's dispatch claims
local mark_prefix = ARGV[1]        -- this claimer's claims start so: 'pending:<claimer>:'
local id_count = tonumber(ARGV[2]) -- how many subscription ids follow
local FIRST_ID = 3                 -- ARGV[FIRST_ID .. FIRST_ID + id_count - 1]: their ids
local released = 0
for i = FIRST_ID, FIRST_ID + id_count - 1 do
  local mark = redis.call('HGET', claims, ARGV[i])
  if mark and string.sub(mark, 1, #mark_prefix) == mark_prefix then
    released = released + redis.call('HDEL', claims, ARGV[i])
  end
end
return released
