-- Gives a purge's step back: the tasks queue_purge.lua took, whose records could not be
-- written, go back to the heads of their lists in the order they were taken, with their
-- bodies (a worker takes them next, as it would have).
-- KEYS: pairs of (list, bodies hash), as queue_purge.lua's. ARGV: (list's index in KEYS,
-- id, body) for each task, in the order queue_purge.lua returned them.
-- A task whose body is there already was given back by an earlier call (this one is a
-- retry whose first reply was lost): it is not pushed twice.
local given = 0
for a = #ARGV - 2, 1, -3 do
    local i = tonumber(ARGV[a])
    if redis.call("hsetnx", KEYS[i + 1], ARGV[a + 1], ARGV[a + 2]) == 1 then
        redis.call("lpush", KEYS[i], ARGV[a + 1])
        given = given + 1
    end
end
return given
