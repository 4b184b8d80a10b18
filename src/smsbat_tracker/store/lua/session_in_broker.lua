-- Which of some task ids a message in the broker carries, one bounded slice at a time
-- (Broker.in_broker calls it until it is DONE): the queues' lists, then kombu's hash of
-- fetched, unacknowledged messages, searched on the server (the messages never travel).
-- A call reads at most budget entries, so that a backlog never blocks Redis for long.
-- The places are numbered: 1 .. queue_count the queue lists, UNACKED_AT the hash. A list is
-- read from its head (where kombu pushes) by offset: the consumers pop at the other end, so
-- an entry is never skipped. The lists go first: a message fetched meanwhile moves from
-- them to the hash, read last.
-- Returns {the place to go on at (DONE: finished, or every id found), the offset or HSCAN
-- cursor in it, the ids found, and for those found in the hash: id, delivery tag, ...}.
local unacked = KEYS[1]            -- kombu's hash of fetched, unacknowledged messages
local FIRST_QUEUE = 2              -- KEYS[FIRST_QUEUE ..]: the queue_count queue lists
local budget = tonumber(ARGV[1])   -- the most entries read in this call
local at = tonumber(ARGV[2])       -- the place to start at (1 to start)
local cursor = ARGV[3]             -- the offset or HSCAN cursor in it ('0' to start)
local queue_count = tonumber(ARGV[4])
local id_count = tonumber(ARGV[5])
local FIRST_ID = 6                 -- ARGV[FIRST_ID .. FIRST_ID + id_count - 1]: the ids
local DONE = 0
local UNACKED_AT = queue_count + 1

local want, left, found, tags = {}, 0, {}, {}
for i = FIRST_ID, FIRST_ID + id_count - 1 do
  if not want[ARGV[i]] then
    want[ARGV[i]] = true
    left = left + 1
  end
end

-- Looks for the ids still wanted in entries[first], entries[first + step], ...; in the
-- hash (step 2) the entry before each message is its delivery tag.
local function look(entries, first, step)
  for i = first, #entries, step do
    for id in pairs(want) do
      if string.find(entries[i], id, 1, true) then
        found[#found + 1] = id
        want[id] = nil
        left = left - 1
        if step == 2 then
          tags[#tags + 1] = id
          tags[#tags + 1] = entries[i - 1]
        end
      end
    end
  end
end

while left > 0 and budget > 0 and at <= UNACKED_AT do
  if at < UNACKED_AT then
    local from = tonumber(cursor)
    local entries = redis.call('LRANGE', KEYS[FIRST_QUEUE + at - 1], from, from + budget - 1)
    look(entries, 1, 1)
    if #entries < budget then
      at, cursor = at + 1, '0'
    else
      cursor = tostring(from + #entries)
    end
    budget = budget - #entries
  else
    local reply = redis.call('HSCAN', unacked, cursor, 'COUNT', budget)
    local pairs_read = reply[2]    -- field, value, field, value...
    look(pairs_read, 2, 2)
    budget = budget - math.max(1, #pairs_read / 2)  -- an empty slice of the table counts too
    cursor = reply[1]
    if cursor == '0' then at = at + 1 end
  end
end
if left == 0 or at > UNACKED_AT then return {DONE, '0', found, tags} end
return {at, cursor, found, tags}
