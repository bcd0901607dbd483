-- Concurrency and rate limits (dramaturg.flow.limits): all of a task's limits are taken
-- in one atomic step, or none of them.
-- Times are Redis's own clock (TIME), so the workers' clocks do not matter.
--
-- A run is one delivery of a task being started: "<message id>:<run token>", the token
-- made by the worker for that delivery before it asks (so two deliveries of one message
-- running at once, as after a redelivery or a recovered claim while the first still
-- runs, are two runs, and a call of this script run again after its reply was lost is
-- the same run, and takes nothing twice).
-- A concurrency key is a sorted set of leases: member = the run, score = when the lease
-- ends (ms). Leases past their end are dropped before counting: a worker killed with its
-- slots frees them when their lease ends. A run holds one slot of a key, and releases
-- and renews only its own (by its member: compare-and-delete).
-- A rate key is a sorted set of starts within the window: member = the run, score = when
-- it started; starts older than the window are dropped before counting (a sliding
-- window: at most `limit` starts in any window of `ms`).
--
-- ARGV[1]: the step.
-- acquire_many: ARGV[2] = r, then releases written first (as release_many: KEYS[1 .. r],
--   the runs ARGV[3 .. r + 2]), then the acquires of many tasks (see below); one answer each.
--   Per task, KEYS: the tasks of its queue waiting for a limit (for `dramaturg stats`),
--   then two per limit (see take).
--   -> {1} when every limit let it start (each took its slot or its start, or the run
--      held them already), {1, g1, .., gn} when it also took gi credits of limit i
--      (see take), {0, i, ms} when limit i did not: ms until a lease ends or the oldest
--      start leaves the window.
-- release: ARGV[2] = the run; its lease leaves every KEYS[i]. -> how many it held.
-- release_many: ARGV[i + 1] = the run whose lease leaves KEYS[i] (the releases of
--   many tasks, written together off the message path). -> how many were held.
-- refused_many: tasks a worker process put back without asking (it was refused their key
--   a moment before; dramaturg.flow.control): per task, KEYS the key's waiting tasks and its
--   queue's, ARGV[i + 1] its message id; they count as waiting as if refused here. -> 0.
-- renew: ARGV[2] = the run, ARGV[3] = the lease in ms from now; every lease it
--   still holds in KEYS[i] ends then. -> how many it still held.
local call = redis.call
local step, member = ARGV[1], ARGV[2]
local time = call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
-- A task refused this long ago and not since is no longer counted as waiting (it was
-- held, purged or lost meanwhile): the longest wait between two tries, with room to spare.
local WAITING_MS = 60000
-- Take every limit of one task: its keys are KEYS[k + 1 .. k + 2n], its values ARGV[a + 1 ..
-- a + 4n] ("c" or "r", the limit, the lease or window in ms, the credits wanted).
--
-- Credits: starts or slots taken ahead for the asking process to hand out to its next
-- tasks itself, with no call (dramaturg.flow.state); the process uses one at most CREDIT_MS
-- after it sent this call (which is before now), and gives back (releases) those it did not.
-- A rate credit counts as a start at now + CREDIT_MS: a start made with it falls before the
-- start it counts as, so any window holding the real start also holds its count, and the
-- bound stays exact. A concurrency credit is a slot whose lease ends at now + CREDIT_MS +
-- the lease: counted as in use from now, it leaves the run that takes it the whole lease.
-- They are taken only where nobody waits for the key and there is room.
local CREDIT_MS = 200
-- Each limit has two keys: KEYS[k + 2i - 1] its leases or starts, KEYS[k + 2i] the tasks
-- waiting for it (member = message id, score = when it was last refused), for `dramaturg limits`.
-- `queued`: the tasks of the task's queue that wait for a limit (member = message id,
-- score = when it was last refused), for the waiting column of `dramaturg stats`.
local function refuse(waiting, queued, id, wait)
  call('ZADD', waiting, now, id)
  call('PEXPIRE', waiting, WAITING_MS)
  call('ZADD', queued, now, id)
  call('PEXPIRE', queued, WAITING_MS)
  return wait
end

local function take(id, token, queued, k, a, n)
  local member = id .. ':' .. token
  for i = 1, n do
    local kind, limit, ms = ARGV[a + 4 * i - 3], tonumber(ARGV[a + 4 * i - 2]), tonumber(ARGV[a + 4 * i - 1])
    local key, waiting = KEYS[k + 2 * i - 1], KEYS[k + 2 * i]
    if kind == 'c' then
      call('ZREMRANGEBYSCORE', key, '-inf', now)
    else
      call('ZREMRANGEBYSCORE', key, '-inf', now - ms)
    end
    -- A run that holds it already (this call run again) is not counted against itself.
    if not call('ZSCORE', key, member) and call('ZCARD', key) >= limit then
      local first = call('ZRANGE', key, 0, 0, 'WITHSCORES')
      if kind == 'c' then
        return refuse(waiting, queued, id, {0, i, math.max(0, tonumber(first[2]) - now)})
      end
      return refuse(waiting, queued, id, {0, i, math.max(1, tonumber(first[2]) + ms - now)})
    end
  end
  local answer, granted = {1}, 0
  for i = 1, n do
    local kind, limit, ms, want = ARGV[a + 4 * i - 3], tonumber(ARGV[a + 4 * i - 2]), tonumber(ARGV[a + 4 * i - 1]), tonumber(ARGV[a + 4 * i])
    local key = KEYS[k + 2 * i - 1]
    call('ZREM', KEYS[k + 2 * i], id)
    local credits, score = 0, now + CREDIT_MS
    if kind == 'c' then
      call('ZADD', key, now + ms, member)
      score = score + ms
    else
      call('ZADD', key, 'NX', now, member)  -- a run counts one start, when it first took it
    end
    if want > 0 and call('EXISTS', KEYS[k + 2 * i]) == 0 then
      credits = math.min(want, limit - call('ZCARD', key))
      if credits > 0 then
        local entries = {}
        for j = 1, credits do
          entries[2 * j - 1], entries[2 * j] = score, member .. ':' .. j
        end
        call('ZADD', key, unpack(entries))
        ms = ms + CREDIT_MS
      else
        credits = 0
      end
    end
    answer[i + 1], granted = credits, granted + credits
    if call('PTTL', key) < ms then
      call('PEXPIRE', key, ms)
    end
  end
  call('ZREM', queued, id)
  if granted == 0 then
    return {1}
  end
  return answer
end

if step == 'acquire_many' then
  -- ARGV[2] = r releases (see above); then per task, its message id, its run token, its
  -- number of limits n, then its 4n values.
  local r = tonumber(ARGV[2])
  for i = 1, r do
    call('ZREM', KEYS[i], ARGV[i + 2])
  end
  local answers, k, a = {}, r, r + 3
  while a < #ARGV do
    local id, token, n = ARGV[a], ARGV[a + 1], tonumber(ARGV[a + 2])
    answers[#answers + 1] = take(id, token, KEYS[k + 1], k + 1, a + 2, n)
    k, a = k + 1 + 2 * n, a + 3 + 4 * n
  end
  return answers
elseif step == 'release' then
  local held = 0
  for i = 1, #KEYS do
    held = held + call('ZREM', KEYS[i], member)
  end
  return held
elseif step == 'release_many' then
  local held = 0
  for i = 1, #KEYS do
    held = held + call('ZREM', KEYS[i], ARGV[i + 1])
  end
  return held
elseif step == 'refused_many' then
  for i = 1, #KEYS, 2 do
    refuse(KEYS[i], KEYS[i + 1], ARGV[(i + 1) / 2 + 1], 0)
  end
  return 0
elseif step == 'renew' then
  local ms = tonumber(ARGV[3])
  local held = 0
  for i = 1, #KEYS do
    if call('ZADD', KEYS[i], 'XX', 'CH', now + ms, member) == 1 or call('ZSCORE', KEYS[i], member) then
      held = held + 1
      if call('PTTL', KEYS[i]) < ms then
        call('PEXPIRE', KEYS[i], ms)
      end
    end
  end
  return held
end
return redis.error_reply('limits.lua: unknown step ' .. tostring(step))
