-- The schedules' ledger: every step that must be atomic across schedulers.
-- KEYS[1]: the prefix of a schedule's hash ("<namespace>:__schedule__:"),
-- KEYS[2]: the registry ("<namespace>:__schedules__", id -> digest of its definition).
-- ARGV[1]: the step; the rest depends on it (see dramaturg/schedules/state.py).
--
-- A schedule's hash: last (the newest slot claimed, ms), pending (a slot claimed and not
-- yet known to be sent) and pending_until (when its claimant's lease ends, ms), paused
-- ("1"), missed (slots that passed with no firing), and the last firing's message id,
-- slot and time (last_id, last_slot, last_at).
local prefix, registry = KEYS[1], KEYS[2]
local step = ARGV[1]

if step == "claim" then
  -- ARGV: id, digest, slot, now, lease, missed-before-it
  -- 1: claimed; 0: already claimed (by anyone); -1: paused; -2: this definition is not
  -- the registered one (a newer scheduler changed or removed it).
  local id, digest, slot, now, lease = ARGV[2], ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
  if redis.call("HGET", registry, id) ~= digest then return -2 end
  local key = prefix .. id
  if redis.call("HGET", key, "paused") == "1" then return -1 end
  local last = tonumber(redis.call("HGET", key, "last") or "-1")
  if slot <= last then return 0 end
  redis.call("HSET", key, "last", slot, "pending", slot, "pending_until", now + lease)
  local missed = tonumber(ARGV[7])
  if missed > 0 then redis.call("HINCRBY", key, "missed", missed) end
  return 1
end

if step == "sent" then
  -- ARGV: id, slot, message id, now: the claimed slot was published (or skipped: id "")
  local key = prefix .. ARGV[2]
  if redis.call("HGET", key, "pending") == ARGV[3] then
    redis.call("HDEL", key, "pending", "pending_until")
  end
  if ARGV[4] ~= "" then
    redis.call("HSET", key, "last_id", ARGV[4], "last_slot", ARGV[3], "last_at", ARGV[5])
  end
  return 1
end

if step == "recover" then
  -- ARGV: id, digest, now, lease: a slot whose claimant's lease ended before it said it was
  -- sent; the caller publishes it again (same message id), under a lease of its own.
  local id, now = ARGV[2], tonumber(ARGV[4])
  if redis.call("HGET", registry, id) ~= ARGV[3] then return false end
  local key = prefix .. id
  local pending = redis.call("HGET", key, "pending")
  if not pending then return false end
  if tonumber(redis.call("HGET", key, "pending_until") or "0") > now then return false end
  redis.call("HSET", key, "pending_until", now + tonumber(ARGV[5]))
  return pending
end

if step == "register" then
  -- ARGV: now, then id, digest pairs: the registry becomes exactly these schedules (the
  -- last scheduler to start wins); a new one starts from now (its past slots never fire).
  local now = ARGV[2]
  local keep = {}
  for i = 3, #ARGV, 2 do
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
  -- ARGV: id, now: the slots that passed while it was paused never fire
  local key = prefix .. ARGV[2]
  redis.call("HDEL", key, "paused")
  local last = tonumber(redis.call("HGET", key, "last") or "-1")
  if tonumber(ARGV[3]) > last then redis.call("HSET", key, "last", ARGV[3]) end
  return 1
end

return redis.error_reply("unknown step " .. tostring(step))
