-- The second of a check's two round trips (Checks.after), and the settle step of anyone who
-- finishes a tracking. Caches the API's answer, counts the poll, gives back an unused turn,
-- pauses everyone after a 429; then either settles (step SETTLE: records the outcome and
-- claims the callbacks to dispatch) or schedules the owner's next run (step RESCHEDULE).
-- Returns {DONE (or SUPERSEDED: the run is no longer the one the session expects), 1 when
-- the unknown status was noted for the first time (else 0), 1 when this call paused every
-- caller (else 0), settle's reply or {}}.
local session = KEYS[1]            -- the tracking's session
local status = KEYS[2]             -- the cached status
local due = KEYS[3]                -- the due index
local outcome_key = KEYS[4]        -- the recorded outcome
local subs = KEYS[5]               -- the subscriptions
local claims = KEYS[6]             -- the dispatch claims
local gate = KEYS[7]               -- the message's gate
local bucket = KEYS[8]             -- the rate limit's bucket
local pause_key = KEYS[9]          -- and its pause
local owner = ARGV[1]              -- RESCHEDULE: the run's task id
local run = ARGV[2]                -- RESCHEDULE: the run's number
local due_member = ARGV[3]         -- the session's member of the due index
local step = ARGV[4]               -- SETTLE or RESCHEDULE
local next_score = ARGV[5]         -- RESCHEDULE: when the next run is due
local ran = ARGV[6]                -- RESCHEDULE: ANSWERED, FAILED or NEITHER
local count_poll = ARGV[7] == '1'  -- a request was made
local mark_pushed = ARGV[8] == '1' -- the provider pushes this message's changes
local unknown_status = ARGV[9]     -- a status the tracker does not know, to note once, or ''
local unused_turn_us = ARGV[10]    -- the emission interval, to give an unused turn back; or ''
local pause_ms = ARGV[11]          -- a 429's pause for every caller, or ''
local result = ARGV[12]            -- SETTLE: the result JSON to record, '' for none
local outcome_ttl_ms = ARGV[13]    -- SETTLE: how long the outcome is kept
local claimer = ARGV[14]           -- SETTLE: who claims the callbacks
local now_ms = ARGV[15]            -- SETTLE: now
local stale_ms = ARGV[16]          -- SETTLE: a claim this old belongs to a claimer that died
local cache_answer = ARGV[17] == '1' -- the API's answer follows, to cache (store's A):
local body = ARGV[18]
local final = ARGV[19]
local status_time = ARGV[20]
local ttl_ms = ARGV[21]
local final_ttl_ms = ARGV[22]
local observed_at = ARGV[23]
local source = ARGV[24]
local ts = ARGV[25]
local history_length = ARGV[26]
local deliverystatus = ARGV[27]
local why = ARGV[28]               -- RESCHEDULE: the kind of reason the next run comes for
--! include lib/status.lua
--! include lib/adjust.lua
--! include lib/forget.lua
local SUPERSEDED, DONE = 0, 1
local SETTLE = 'settle'           -- any other step (RESCHEDULE: 'reschedule') reschedules
local ANSWERED, FAILED = '1', 'f'

-- Records what the run was and schedules the owner's next run, fenced: only the session's
-- owner, in the run the session expects, may. DONE, or SUPERSEDED.
local function reschedule()
  local s = redis.call('HMGET', session, 'owner', 'run')
  if s[1] ~= owner or (s[2] and tonumber(s[2]) ~= tonumber(run)) then return SUPERSEDED end
  if ran == ANSWERED then
    redis.call('HINCRBY', session, 'checks', 1)
    redis.call('HDEL', session, 'failures', 'line', 'ticket')
  elseif ran == FAILED then
    redis.call('HINCRBY', session, 'failures', 1)
    redis.call('HDEL', session, 'line', 'ticket')
  end
  redis.call('HSET', session, 'run', tonumber(run) + 1, 'due', next_score)
  if why and why ~= '' then redis.call('HINCRBY', session, 'why:' .. why, 1) end
  redis.call('ZADD', due, next_score, due_member)
  return DONE
end

-- Records the outcome if none is recorded, then claims every subscription that is not
-- dispatched: unclaimed, claimed earlier by this same claimer (its run was interrupted), or
-- claimed by another claimer longer ago than stale_ms (that claimer died). While anything
-- is left to dispatch the message stays in the due index, due now: if the claimer dies
-- before it marks its dispatch sent, the re-driver hands the claim on. A subscription the
-- outcome served before it was forgotten counts as sent. When nothing is left to dispatch,
-- what the tracking leaves is cut to its outcome (forget).
-- Returns {1 when recorded here (else 0), the outcome's result JSON or '', the claimed
-- (id, JSON) pairs, flat, the ids of the claims taken over}.
local function settle()
  local outcome = redis.call('GET', outcome_key)
  local recorded = 0
  local served = {}
  if outcome then
    local tail
    outcome, tail = outcome_parts(outcome)
    served = served_ids(tail)
  else
    if result == '' then return {0, '', {}, {}} end
    outcome = result
    recorded = 1
    redis.call('SET', outcome_key, outcome, 'PX', outcome_ttl_ms)
    if redis.call('EXISTS', session) == 1 then
      redis.call('HSET', session, 'finished', '1')
      redis.call('PEXPIRE', session, outcome_ttl_ms)
    end
  end
  local now = tonumber(now_ms)
  local mine = 'pending:' .. claimer .. ':'
  local claimed = {}
  local retaken = {}
  local unsent = false
  local all = redis.call('HGETALL', subs)
  for i = 1, #all, 2 do
    local id = all[i]
    local mark = redis.call('HGET', claims, id)
    if served[id] then mark = 'sent' end
    local take = false
    if not mark then
      take = true
    elseif string.sub(mark, 1, 8) == 'pending:' then
      local at = tonumber(string.match(mark, ':(%d+)$')) or 0
      take = string.sub(mark, 1, #mine) == mine or now - at > tonumber(stale_ms)
      unsent = true
    end
    if take then
      redis.call('HSET', claims, id, mine .. now_ms)
      claimed[#claimed + 1] = id
      claimed[#claimed + 1] = all[i + 1]
      if mark then retaken[#retaken + 1] = id end
    end
  end
  if #all > 0 then
    redis.call('PEXPIRE', subs, outcome_ttl_ms)
    redis.call('PEXPIRE', claims, outcome_ttl_ms)
  end
  if #claimed > 0 then
    redis.call('ZADD', due, now / 1000, due_member)
  elseif not unsent then
    redis.call('ZREM', due, due_member)
    forget(outcome_key, subs, claims, session, status)
  end
  return {recorded, outcome, claimed, retaken}
end

if cache_answer then
  store({status}, {
    body, final, status_time, ttl_ms, final_ttl_ms, observed_at, source, ts, history_length,
    deliverystatus,
  })
end
local unknown = 0
if redis.call('EXISTS', session) == 1 then
  if count_poll then redis.call('HINCRBY', session, 'polls', 1) end
  if mark_pushed then redis.call('HSET', session, 'pushed', 1) end
  if unknown_status ~= '' then
    unknown = redis.call('HSETNX', session, 'unknown:' .. unknown_status, 1)
  end
end
if unused_turn_us ~= '' then
  redis.call('DEL', gate)
  unreserve({bucket}, tonumber(unused_turn_us), 1)
end
local paused = 0
if pause_ms ~= '' then paused = pause({bucket, pause_key}, tonumber(pause_ms)) end
if step == SETTLE then return {DONE, unknown, paused, settle()} end
return {reschedule(), unknown, paused, {}}
