-- A new tracking's whole registration in one round trip (Sessions.register): the
-- subscription (HSETNX), the session (open_session, lib/session.lua), and what is cached
-- and recorded. A subscription that joins a session which may have ended already gets a
-- due entry too: if its run is lost, the re-driver finishes its dispatch.
-- Returns {the session's fields, 1 when the subscription is new (else 0), the cached status
-- or false, 1 when an outcome is recorded (else 0)}.
local session = KEYS[1]            -- the tracking's session
local subs = KEYS[2]               -- its subscriptions
local status = KEYS[3]             -- the cached status
local due = KEYS[4]                -- the due index
local outcome = KEYS[5]            -- the recorded outcome
local owner = ARGV[1]              -- the task id that tracks the message
local started_at = ARGV[2]
local deadline_at = ARGV[3]
local session_ttl_ms = ARGV[4]
local due_score = ARGV[5]          -- when the first run is due
local due_member = ARGV[6]         -- the session's member of the due index
local subscription = ARGV[7]       -- the subscription's id, '' for none
local subscription_json = ARGV[8]
local subs_ttl_ms = ARGV[9]
--! include lib/session.lua
local added = 0
if subscription ~= '' then
  added = redis.call('HSETNX', subs, subscription, subscription_json)
  redis.call('PEXPIRE', subs, subs_ttl_ms)
end
local fields = open_session(session, due, owner, started_at, deadline_at, session_ttl_ms,
                            due_score, due_member)
if added == 1 then redis.call('ZADD', due, 'NX', due_score, due_member) end
return {fields, added, redis.call('GET', status), redis.call('EXISTS', outcome)}
