-- Locks (dramaturg.flow.locks): acquire, release, renew, each one atomic step.
-- KEYS[1]: the lock, "<owner> <fence> <holder>" while held, expiring with its ttl.
-- KEYS[2]: the hash of fencing tokens, one counter per lock name, never expiring (so a
--          token only grows, even across the lock's expiry).
-- ARGV[1]: the step; ARGV[2]: the owner (a random id of this holding); ARGV[3]: the ttl
-- in ms (acquire, renew); ARGV[4]: the name (acquire); ARGV[5]: the holder's label.
-- acquire -> {1, fence} when taken, {0, ms until it expires} when held by another.
-- release -> 1 when it was ours and is freed, 0 when it was not ours (expired, taken).
-- renew   -> 1 when it was ours and now expires ttl from now, 0 when it was not ours.
local step, owner = ARGV[1], ARGV[2]
local call = redis.call
local function ours()
  local value = call('GET', KEYS[1])
  return value and string.sub(value, 1, #owner + 1) == owner .. ' '
end
if step == 'acquire' then
  if call('EXISTS', KEYS[1]) == 1 then
    return {0, call('PTTL', KEYS[1])}
  end
  local fence = call('HINCRBY', KEYS[2], ARGV[4], 1)
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
