-- Unique tasks (dramaturg.flow.unique): a key names the one task that may be queued or
-- running for it. KEYS[1]: the key, its value the message id of that task.
-- claim: ARGV[2] = the new task's message id, ARGV[3] = the key's ttl in ms.
--   -> the id of the task that holds it already, or "" when the new task now holds it.
-- release: ARGV[2] = the message id; the key is deleted only if that task holds it. -> 1 or 0.
local call = redis.call
local step, id = ARGV[1], ARGV[2]
if step == 'claim' then
  local holder = call('GET', KEYS[1])
  if holder then
    return holder
  end
  call('SET', KEYS[1], id, 'PX', ARGV[3])
  return ''
elseif step == 'release' then
  if call('GET', KEYS[1]) == id then
    return call('DEL', KEYS[1])
  end
  return 0
end
return redis.error_reply('unique.lua: unknown step ' .. tostring(step))
