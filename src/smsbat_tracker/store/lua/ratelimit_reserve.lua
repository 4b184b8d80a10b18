-- Book rate-limit tokens, oldest request first (RateLimiter.reserve).
-- Returns {1, wait_us}: booked from then on; {0, wait_us}: nothing booked, ask again then.
local bucket = KEYS[1]             -- the theoretical arrival time, us
local pause_key = KEYS[2]          -- when a pause ends, ms
local waiters = KEYS[3]            -- waiters by when their request fell due, us
local waiters_back = KEYS[4]       -- waiters by when they are expected back, us
local interval_us = ARGV[1]        -- the emission interval
local tolerance_us = ARGV[2]       -- the burst tolerance
local tokens = ARGV[3]
local ahead_us = ARGV[4]           -- how long the caller would wait for them
local waiter = ARGV[5]             -- the caller's name, '' for a one-off caller
local due_us = ARGV[6]             -- when its request fell due, '' for now
local grace_us = ARGV[7]           -- how late a waiter may come back before it is forgotten
local window_us = ARGV[8]          -- how far ahead tokens are kept for the line
--! include lib/reserve.lua
return reserve({bucket, pause_key, waiters, waiters_back}, {
  interval_us, tolerance_us, tokens, ahead_us, waiter, due_us, grace_us, window_us,
})
