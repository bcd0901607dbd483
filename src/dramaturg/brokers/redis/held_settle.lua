-- Ends the lease on tasks still taken with token ARGV[2] (after held_functions.lua):
-- "back" gives them back, "forget" drops them, "renew" moves the end of their lease to
-- ARGV[4]. Returns how many.
-- ARGV: now, token, "back" | "forget" | "renew", when the lease runs out, the ids...
local count = 0
for i = 5, #ARGV do
    local id = ARGV[i]
    if redis.call("hget", KEYS[5], id) == ARGV[2] then
        count = count + 1
        if ARGV[3] == "back" then
            give_back(id, ARGV[1])
        elseif ARGV[3] == "renew" then
            redis.call("zadd", KEYS[4], ARGV[4], id)
        else
            redis.call("hdel", KEYS[3], id)
            redis.call("zrem", KEYS[4], id)
            redis.call("hdel", KEYS[5], id)
        end
    end
end
return count
