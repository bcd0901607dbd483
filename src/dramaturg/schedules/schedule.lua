-- The schedules' ledger: every step that must be atomic across schedulers.
-- KEYS[1]: the prefix of a schedule's hash ("<namespace>:__schedule__:"),
-- KEYS[2]: the registry ("<namespace>:__schedules__", id -> digest of its definition).
-- ARGV[1]: the step; the rest depends on it (see dramaturg/schedules/state.py).
--
-- A schedule's hash: last (the newest slot claimed, ms), paused ("1"), missed (slots that
-- passed with no firing), and the last firing's message id, slot and time (last_id,
-- last_slot, last_at). Beside it, "<hash>:pending": the slots claimed and not yet known
-- to be sent, each with the end of its claimant's lease (ms); one per slot, so that a
-- claimant that dies leaves its slot there while the next slots are claimed.
--
-- Time: every lease is dated, and read, by this server's clock (TIME), never a caller's:
-- schedulers on hosts whose clocks disagree agree on whether a lease has ended, and on
-- where a newly registered or resumed schedule starts. The slots themselves (which one is
-- due) are the callers' wall-clock times.
local prefix, registry = KEYS[1], KEYS[2]
local step = ARGV[1]

local function server_ms()
  local time = redis.call("TIME")
  return tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
end

if step == "claim" then
  -- ARGV: id, digest, slot, lease, missed-before-it, the newest slot the caller saw
  -- claimed (the missed ones are counted only if it is still the newest: never twice)
  -- 1: claimed; 0: already claimed (by anyone); -1: paused; -2: this definition is not
  -- the registered one (a newer scheduler changed or removed it).
  local id, digest, slot, lease = ARGV[2], ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5])
  if redis.call("HGET", registry, id) ~= digest then return -2 end
  local key = prefix .. id
  if redis.call("HGET", key, "paused") == "1" then return -1 end
  local last = tonumber(redis.call("HGET", key, "last") or "-1")
  if slot <= last then return 0 end
  redis.call("HSET", key, "last", slot)
  redis.call("HSET", key .. ":pending", slot, server_ms() + lease)
  local missed = tonumber(ARGV[6])
  if missed > 0 and last == tonumber(ARGV[7]) then redis.call("HINCRBY", key, "missed", missed) end
  return 1
end

if step == "sent" then
  -- ARGV: id, slot, message id, now: the claimed slot was published (or skipped: id "")
  local key = prefix .. ARGV[2]
  redis.call("HDEL", key .. ":pending", ARGV[3])
  -- the newest firing is the last run (a recovered older slot is not; a manual run, slot -1, is)
  local shown = tonumber(redis.call("HGET", key, "last_slot") or "-1")
  if ARGV[4] ~= "" and (ARGV[3] == "-1" or tonumber(ARGV[3]) >= shown) then
    redis.call("HSET", key, "last_id", ARGV[4], "last_slot", ARGV[3], "last_at", ARGV[5])
    redis.call("HDEL", key, "last_outcome")
  end
  return 1
end

if step == "outcome" then
  -- ARGV: id, slot, text: what became of the last firing, when no task status says it (a drain)
  local key = prefix .. ARGV[2]
  if redis.call("HGET", key, "last_slot") == ARGV[3] then redis.call("HSET", key, "last_outcome", ARGV[4]) end
  return 1
end

if step == "recover" then
  -- ARGV: id, digest, lease: the oldest slot whose claimant's lease ended before it
  -- said it was sent; the caller publishes it again (same message id), under a lease of its own.
  local id, now = ARGV[2], server_ms()
  if redis.call("HGET", registry, id) ~= ARGV[3] then return false end
  local pending = prefix .. id .. ":pending"
  local found = redis.call("HGETALL", pending)
  local oldest = nil
  for i = 1, #found, 2 do
    if tonumber(found[i + 1]) <= now and (oldest == nil or tonumber(found[i]) < tonumber(oldest)) then
      oldest = found[i]
    end
  end
  if oldest == nil then return false end
  redis.call("HSET", pending, oldest, now + tonumber(ARGV[4]))
  return oldest
end

-- Where a newly registered or resumed schedule starts: the earlier of the store's now and
-- the caller's (ARGV, "" for none). Slots are due by the schedulers' clocks: a start by a
-- clock ahead of theirs would skip the slots in between.
local function start_ms(caller)
  local now = server_ms()
  if caller ~= nil and caller ~= "" and tonumber(caller) < now then return tonumber(caller) end
  return now
end

if step == "register" then
  -- ARGV: how far back from now a new schedule starts (ms, usually 0), the caller's now
  -- (ms, or ""), then id, digest pairs: the registry becomes exactly these schedules (the
  -- last scheduler to start wins); a new one starts from then (its slots before it never fire).
  local now = start_ms(ARGV[3]) - tonumber(ARGV[2])
  local keep = {}
  for i = 4, #ARGV, 2 do
    keep[ARGV[i]] = true
    redis.call("HSET", registry, ARGV[i], ARGV[i + 1])
    redis.call("HSETNX", prefix .. ARGV[i], "last", now)
  end
  local removed = 0
  for _, id in ipairs(redis.call("HKEYS", registry)) do
    if not keep[id] then
      redis.call("HDEL", registry, id)
      removed = removed + 1
    end
  end
  return removed
end

if step == "pause" then
  -- ARGV: id
  redis.call("HSET", prefix .. ARGV[2], "paused", "1")
  return 1
end

if step == "resume" then
  -- ARGV: id, the caller's now (ms, or ""): the slots that passed while it was paused never fire
  local key = prefix .. ARGV[2]
  redis.call("HDEL", key, "paused")
  local last = tonumber(redis.call("HGET", key, "last") or "-1")
  local now = start_ms(ARGV[3])
  if now > last then redis.call("HSET", key, "last", now) end
  return 1
end

return redis.error_reply("unknown step " .. tostring(step))
