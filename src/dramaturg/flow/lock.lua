-- Locks (dramaturg.flow.locks): acquire, release, renew, each one atomic step.
-- KEYS[1]: the lock, "<owner> <fence> <holder>" while held, expiring with its ttl.
-- KEYS[2]: the hash of fencing tokens, the last one handed out per lock name, never
--          expiring (so a token only grows, even across the lock's expiry).
-- A token is max(the last one + 1, Redis's clock in microseconds): it grows by at least
-- one per holding while the hash is there, and a store wiped since (FLUSHALL, a restart
-- without persistence, a new server) starts again from its clock, above every token
-- handed out before as long as that clock reads later than when the last of them was
-- handed out. The counter does not run ahead of the clock: two holdings of one name are
-- at least an acquire and a release apart, each a call of this script (microseconds each).
-- ARGV[1]: the step; ARGV[2]: the owner (a random id of this holding); ARGV[3]: the ttl
-- in ms (acquire, renew); ARGV[4]: the name (acquire); ARGV[5]: the holder's label.
-- acquire -> {1, fence} when taken, {0, ms until it expires} when held by another. Asked
--   again by the same owner while it holds it (its first reply lost): {1, the same fence},
--   its ttl from now, so the holding that took it is not left to wait for itself.
-- release -> 1 when it was ours and is freed, 0 when it was not ours (expired, taken).
-- renew   -> 1 when it was ours and now expires ttl from now, 0 when it was not ours.
local step, owner = ARGV[1], ARGV[2]
local call = redis.call
local function ours()
  local value = call('GET', KEYS[1])
  return value and string.sub(value, 1, #owner + 1) == owner .. ' '
end
if step == 'acquire' then
  local held = call('GET', KEYS[1])
  if held then
    if string.sub(held, 1, #owner + 1) == owner .. ' ' then
      call('PEXPIRE', KEYS[1], ARGV[3])
      return {1, string.match(held, '^%S+ (%d+)')}
    end
    return {0, call('PTTL', KEYS[1])}
  end
  local time = call('TIME')
  local last = tonumber(call('HGET', KEYS[2], ARGV[4]) or '0')
  -- Under 2^53 (about 1.8e15 now), so exact in Lua's numbers; written with %.0f, not
  -- tostring (which would write 1.7645e+15).
  local fence = string.format('%.0f', math.max(last + 1, tonumber(time[1]) * 1000000 + tonumber(time[2])))
  call('HSET', KEYS[2], ARGV[4], fence)
  call('SET', KEYS[1], owner .. ' ' .. fence .. ' ' .. ARGV[5], 'PX', ARGV[3])
  return {1, fence}
elseif step == 'release' then
  if ours() then
    call('DEL', KEYS[1])
    return 1
  end
  return 0
elseif step == 'renew' then
  if ours() then
    call('PEXPIRE', KEYS[1], ARGV[3])
    return 1
  end
  return 0
end
return redis.error_reply('lock.lua: unknown step ' .. tostring(step))
