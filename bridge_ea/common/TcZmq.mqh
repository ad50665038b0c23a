//+------------------------------------------------------------------+
//| TcZmq.mqh - minimal, self-contained libzmq binding for tradecopy |
//|                                                                  |
//| Shared by MQL5 (64-bit terminal) and MQL4 (32-bit terminal).     |
//| Only what the bridge needs: one context per MQL program, DEALER  |
//| (connector link, CURVE client), PUSH/PULL (EA -> MT5 service),   |
//| non-blocking send/recv and zmq_poll.                             |
//|                                                                  |
//| libzmq.dll must be in <data folder>\MQL5\Libraries (64-bit build)|
//| or <data folder>\MQL4\Libraries (32-bit build); see README.md.   |
//+------------------------------------------------------------------+
#ifndef TC_ZMQ_MQH
#define TC_ZMQ_MQH

//--- Pointer-sized integers. MT5 has been 64-bit only for years; MT4 is 32-bit.
//--- size_t follows the pointer size on Windows (LLP64), C "long" does not:
//--- it stays 32-bit, which is why zmq_poll's timeout is declared "int" below.
#ifdef __MQL5__
   #define TC_PTR       long
   #define TC_SIZE      long
   #define TC_PTR_BYTES 8
#else
   #define TC_PTR       int
   #define TC_SIZE      int
   #define TC_PTR_BYTES 4
#endif

#import "libzmq.dll"
TC_PTR zmq_ctx_new();
int    zmq_ctx_term(TC_PTR context);
TC_PTR zmq_socket(TC_PTR context, int type);
int    zmq_close(TC_PTR s);
//--- option values are passed by pointer in C: an MQL reference (scalar or array) is a pointer
int    zmq_setsockopt(TC_PTR s, int option, const uchar &optval[], TC_SIZE optvallen);
int    zmq_setsockopt(TC_PTR s, int option, int &optval, TC_SIZE optvallen);
int    zmq_connect(TC_PTR s, const uchar &addr[]);
int    zmq_bind(TC_PTR s, const uchar &addr[]);
int    zmq_send(TC_PTR s, const uchar &buf[], TC_SIZE len, int flags);
int    zmq_recv(TC_PTR s, uchar &buf[], TC_SIZE len, int flags);
//--- items: raw zmq_pollitem_t array built byte by byte (see TcPoll), so the layout does not
//--- depend on how MQL packs structures.
int    zmq_poll(uchar &items[], int nitems, int timeout);
int    zmq_errno();
void   zmq_version(int &major, int &minor, int &patch);
//--- libzmq >= 4.1: 1 when the build has the capability ("curve": CurveZMQ encryption)
int    zmq_has(const uchar &capability[]);
#import

//--- A precise UTC wall clock. TimeGMT() has 1 s resolution, far too coarse for latency
//--- traces; GetSystemTimePreciseAsFileTime (Windows 8+, also in Wine) gives 100 ns ticks.
//--- Compile with TC_NO_PRECISE_CLOCK defined to fall back to TimeGMT().
#ifndef TC_NO_PRECISE_CLOCK
#import "kernel32.dll"
void GetSystemTimePreciseAsFileTime(ulong &filetime);
#import
#endif

//--- socket types
#define TC_ZMQ_PULL              7
#define TC_ZMQ_PUSH              8
#define TC_ZMQ_DEALER            5
//--- socket options (zmq.h, libzmq 4.x)
#define TC_ZMQ_IDENTITY          5      // a.k.a. ZMQ_ROUTING_ID
#define TC_ZMQ_LINGER            17
#define TC_ZMQ_RECONNECT_IVL     18
#define TC_ZMQ_RECONNECT_IVL_MAX 21
#define TC_ZMQ_SNDHWM            23
#define TC_ZMQ_RCVHWM            24
#define TC_ZMQ_TCP_KEEPALIVE     34
#define TC_ZMQ_IMMEDIATE         39
#define TC_ZMQ_HEARTBEAT_IVL     75     // libzmq >= 4.2
#define TC_ZMQ_HEARTBEAT_TIMEOUT 77     // libzmq >= 4.2
#define TC_ZMQ_CURVE_PUBLICKEY   48
#define TC_ZMQ_CURVE_SECRETKEY   49
#define TC_ZMQ_CURVE_SERVERKEY   50
//--- a CURVE key as Z85 text: 40 characters (32 bytes of key)
#define TC_CURVE_KEY_CHARS       40
//--- flags
#define TC_ZMQ_DONTWAIT          1
#define TC_ZMQ_POLLIN            1
//--- errno values as libzmq reports them on Windows (MSVC errno.h + zmq.h)
#define TC_EINTR                 4
#define TC_EAGAIN                11
#define TC_ZMQ_HAUSNUMERO        156384712
#define TC_ETERM                 (TC_ZMQ_HAUSNUMERO + 53)

//--- results of the non-blocking calls
#define TC_SEND_OK               1
#define TC_SEND_AGAIN            0      // queue full / not connected: keep the frame, retry later
#define TC_SEND_ERROR           -1
#define TC_RECV_NONE            -1      // nothing waiting
#define TC_RECV_ERROR           -2
#define TC_RECV_TOO_BIG         -3      // a frame larger than the buffer: protocol error

//--- The outbound high-water mark. Large on purpose: libzmq must never be the place where a
//--- frame is dropped; when this is reached the frame stays in the EA's own FIFO instead.
#define TC_ZMQ_HWM               100000

//+------------------------------------------------------------------+
//| Monotonic milliseconds (GetTickCount wraps after 49 days).       |
//+------------------------------------------------------------------+
ulong TcNowMs()
  {
   return GetMicrosecondCount() / 1000;
  }
//+------------------------------------------------------------------+
//| Wall clock, UTC nanoseconds since 1970.                          |
//+------------------------------------------------------------------+
long TcUtcNowNs()
  {
#ifndef TC_NO_PRECISE_CLOCK
   ulong ft = 0;
   GetSystemTimePreciseAsFileTime(ft);
   //--- FILETIME counts 100 ns since 1601-01-01
   return (long)(ft - 116444736000000000) * 100;
#else
   return (long)TimeGMT() * 1000000000;
#endif
  }
//+------------------------------------------------------------------+
//| UTF-8 bytes of a string, without the terminating zero.           |
//+------------------------------------------------------------------+
int TcUtf8(const string text, uchar &bytes[])
  {
   ArrayResize(bytes, 0);
   if(StringLen(text) == 0)
      return 0;
   int n = StringToCharArray(text, bytes, 0, WHOLE_ARRAY, CP_UTF8);
   //--- StringToCharArray copies the terminating zero as well
   if(n > 0 && bytes[n - 1] == 0)
      n--;
   ArrayResize(bytes, n);
   return n;
  }
//+------------------------------------------------------------------+
//| Null-terminated UTF-8 (what zmq_connect / zmq_bind expect).      |
//+------------------------------------------------------------------+
void TcCString(const string text, uchar &bytes[])
  {
   int n = TcUtf8(text, bytes);
   ArrayResize(bytes, n + 1);
   bytes[n] = 0;
  }
//+------------------------------------------------------------------+
//| libzmq version as text, for the log.                             |
//+------------------------------------------------------------------+
string TcZmqVersion()
  {
   int major = 0, minor = 0, patch = 0;
   zmq_version(major, minor, patch);
   return StringFormat("%d.%d.%d", major, minor, patch);
  }
//+------------------------------------------------------------------+
//| Whether this libzmq.dll can encrypt (CURVE). Builds without it   |
//| exist (vcpkg's zeromq port without the "curve" feature): on one  |
//| of those every CURVE option fails with EINVAL.                   |
//+------------------------------------------------------------------+
bool TcZmqHasCurve()
  {
   uchar cap[];
   TcCString("curve", cap);
   return zmq_has(cap) == 1;
  }
//+------------------------------------------------------------------+
//| A CURVE key as `tradecopy bridge keys` prints it: 40 characters  |
//| of ZeroMQ's Z85 alphabet (32 bytes of key).                      |
//+------------------------------------------------------------------+
bool TcZ85KeyValid(const string key)
  {
   if(StringLen(key) != TC_CURVE_KEY_CHARS)
      return false;
   const string z85 = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.-:+=^!/*?&<>()[]{}@%$#";
   for(int i = 0; i < TC_CURVE_KEY_CHARS; i++)
      if(StringFind(z85, StringSubstr(key, i, 1)) < 0)
         return false;
   return true;
  }
//+------------------------------------------------------------------+
//| One ZeroMQ context per MQL program.                              |
//| zmq_ctx_term blocks until every socket is closed; all our sockets|
//| use LINGER 0, so closing them first makes termination immediate. |
//+------------------------------------------------------------------+
class CTcZmqContext
  {
private:
   TC_PTR            m_ctx;
public:
                     CTcZmqContext() : m_ctx(0) {}
                    ~CTcZmqContext() { Term(); }
   TC_PTR            Get()
     {
      if(m_ctx == 0)
         m_ctx = zmq_ctx_new();
      return m_ctx;
     }
   void              Term()
     {
      if(m_ctx != 0)
        {
         zmq_ctx_term(m_ctx);
         m_ctx = 0;
        }
     }
  };
//+------------------------------------------------------------------+
//| A ZeroMQ socket used without ever blocking the MQL thread.       |
//+------------------------------------------------------------------+
class CTcSocket
  {
private:
   TC_PTR            m_sock;
   int               m_lastErrno;
   uchar             m_tx[];

   bool              SetInt(int option, int value)
     {
      int v = value;
      return zmq_setsockopt(m_sock, option, v, (TC_SIZE)4) == 0;
     }

public:
                     CTcSocket() : m_sock(0), m_lastErrno(0) {}
                    ~CTcSocket() { Close(); }

   bool              IsOpen() const { return m_sock != 0; }
   TC_PTR            Handle() const { return m_sock; }
   int               LastErrno() const { return m_lastErrno; }

   //--- type: TC_ZMQ_DEALER / PUSH / PULL. identity "" = let libzmq choose.
   //--- immediate: true = queue only on completed connections, so while the peer is away
   //--- zmq_send returns EAGAIN and the frame stays in our FIFO (where a new session can
   //--- re-stamp it) instead of in a libzmq pipe we cannot inspect.
   bool              Open(TC_PTR ctx, int type, const string identity, bool immediate)
     {
      Close();
      if(ctx == 0)
        {
         m_lastErrno = zmq_errno();
         return false;
        }
      m_sock = zmq_socket(ctx, type);
      if(m_sock == 0)
        {
         m_lastErrno = zmq_errno();
         return false;
        }
      SetInt(TC_ZMQ_LINGER, 0);                 // closing never blocks the terminal
      SetInt(TC_ZMQ_SNDHWM, TC_ZMQ_HWM);
      SetInt(TC_ZMQ_RCVHWM, TC_ZMQ_HWM);
      SetInt(TC_ZMQ_RECONNECT_IVL, 100);        // reconnect fast on loopback / LAN ...
      SetInt(TC_ZMQ_RECONNECT_IVL_MAX, 2000);   // ... and back off to 2 s
      SetInt(TC_ZMQ_TCP_KEEPALIVE, 1);
      //--- ZMTP heartbeats notice a silently dead peer (no FIN) within a few seconds;
      //--- older libzmq builds reject the option, which is harmless.
      SetInt(TC_ZMQ_HEARTBEAT_IVL, 1000);
      SetInt(TC_ZMQ_HEARTBEAT_TIMEOUT, 3000);
      if(immediate)
         SetInt(TC_ZMQ_IMMEDIATE, 1);
      if(StringLen(identity) > 0)
        {
         uchar id[];
         int n = TcUtf8(identity, id);
         if(zmq_setsockopt(m_sock, TC_ZMQ_IDENTITY, id, (TC_SIZE)n) != 0)
           {
            m_lastErrno = zmq_errno();
            Close();
            return false;
           }
        }
      return true;
     }

   //--- CURVE client: the connection is encrypted and the connector proves it holds the
   //--- secret of server_key; our own key pair authenticates this terminal to the connector.
   //--- Z85 text keys (40 characters), set before Connect. libzmq takes Z85 text with its
   //--- terminating zero (41 bytes), which is what TcCString builds. A libzmq built without
   //--- CURVE fails here with EINVAL (TcZmqHasCurve tells before).
   bool              SetCurveClient(const string server_key, const string public_key,
                                    const string secret_key)
     {
      if(!TcZ85KeyValid(server_key) || !TcZ85KeyValid(public_key) || !TcZ85KeyValid(secret_key))
        {
         m_lastErrno = 0;
         return false;
        }
      return SetKey(TC_ZMQ_CURVE_SERVERKEY, server_key) &&
             SetKey(TC_ZMQ_CURVE_PUBLICKEY, public_key) &&
             SetKey(TC_ZMQ_CURVE_SECRETKEY, secret_key);
     }

   bool              SetKey(int option, const string z85)
     {
      uchar key[];
      TcCString(z85, key);
      if(zmq_setsockopt(m_sock, option, key, (TC_SIZE)ArraySize(key)) != 0)
        {
         m_lastErrno = zmq_errno();
         return false;
        }
      return true;
     }

   bool              Connect(const string endpoint)
     {
      uchar ep[];
      TcCString(endpoint, ep);
      if(zmq_connect(m_sock, ep) != 0)
        {
         m_lastErrno = zmq_errno();
         return false;
        }
      return true;
     }

   bool              Bind(const string endpoint)
     {
      uchar ep[];
      TcCString(endpoint, ep);
      if(zmq_bind(m_sock, ep) != 0)
        {
         m_lastErrno = zmq_errno();
         return false;
        }
      return true;
     }

   void              Close()
     {
      if(m_sock != 0)
        {
         zmq_close(m_sock);
         m_sock = 0;
        }
     }

   //--- Never blocks. TC_SEND_AGAIN means "not now": the caller keeps the frame and retries
   //--- on its next tick/loop. Nothing is ever dropped here.
   int               SendText(const string text)
     {
      if(m_sock == 0)
         return TC_SEND_ERROR;
      int n = TcUtf8(text, m_tx);
      int rc = zmq_send(m_sock, m_tx, (TC_SIZE)n, TC_ZMQ_DONTWAIT);
      if(rc >= 0)
         return TC_SEND_OK;
      m_lastErrno = zmq_errno();
      if(m_lastErrno == TC_EAGAIN || m_lastErrno == TC_EINTR)
         return TC_SEND_AGAIN;
      return TC_SEND_ERROR;
     }

   //--- Never blocks. Returns the byte length of the frame copied into buf, or TC_RECV_*.
   int               Recv(uchar &buf[])
     {
      if(m_sock == 0)
         return TC_RECV_ERROR;
      int cap = ArraySize(buf);
      int rc = zmq_recv(m_sock, buf, (TC_SIZE)cap, TC_ZMQ_DONTWAIT);
      if(rc < 0)
        {
         m_lastErrno = zmq_errno();
         if(m_lastErrno == TC_EAGAIN || m_lastErrno == TC_EINTR)
            return TC_RECV_NONE;
         return TC_RECV_ERROR;
        }
      //--- zmq_recv returns the full message size even when it truncated the copy
      if(rc > cap)
         return TC_RECV_TOO_BIG;
      return rc;
     }
  };
//+------------------------------------------------------------------+
//| zmq_pollitem_t layout on Windows:                                |
//|   void *socket; SOCKET fd (UINT_PTR); short events; short revents|
//| x64: 0 / 8 / 16 / 18, size 24 (4 bytes tail padding)            |
//| x86: 0 / 4 / 8 / 10,  size 12                                    |
//+------------------------------------------------------------------+
#ifdef __MQL5__
   #define TC_POLLITEM_SIZE    24
   #define TC_POLLITEM_EVENTS  16
   #define TC_POLLITEM_REVENTS 18
#else
   #define TC_POLLITEM_SIZE    12
   #define TC_POLLITEM_EVENTS  8
   #define TC_POLLITEM_REVENTS 10
#endif

void TcPollPutItem(uchar &items[], int index, TC_PTR sock)
  {
   int base = index * TC_POLLITEM_SIZE;
   for(int i = 0; i < TC_POLLITEM_SIZE; i++)
      items[base + i] = 0;
   for(int b = 0; b < TC_PTR_BYTES; b++)
      items[base + b] = (uchar)((sock >> (8 * b)) & 0xFF);
   items[base + TC_POLLITEM_EVENTS] = (uchar)TC_ZMQ_POLLIN;   // little-endian short
  }

bool TcPollReadable(const uchar &items[], int index)
  {
   return (items[index * TC_POLLITEM_SIZE + TC_POLLITEM_REVENTS] & TC_ZMQ_POLLIN) != 0;
  }
//+------------------------------------------------------------------+
//| Wait until a or b (either may be 0) has a frame, or timeout_ms.  |
//| The wait ends the moment a frame arrives: the timeout only bounds|
//| how long the caller sleeps when nothing happens.                 |
//+------------------------------------------------------------------+
int TcPoll(TC_PTR a, TC_PTR b, int timeout_ms, bool &a_ready, bool &b_ready)
  {
   a_ready = false;
   b_ready = false;
   uchar items[];
   int n = 0;
   ArrayResize(items, 2 * TC_POLLITEM_SIZE);
   int ia = -1, ib = -1;
   if(a != 0)
     {
      TcPollPutItem(items, n, a);
      ia = n;
      n++;
     }
   if(b != 0)
     {
      TcPollPutItem(items, n, b);
      ib = n;
      n++;
     }
   if(n == 0)
     {
      Sleep(timeout_ms);
      return 0;
     }
   int rc = zmq_poll(items, n, timeout_ms);
   if(rc <= 0)
      return rc;
   if(ia >= 0)
      a_ready = TcPollReadable(items, ia);
   if(ib >= 0)
      b_ready = TcPollReadable(items, ib);
   return rc;
  }

#endif // TC_ZMQ_MQH
//+------------------------------------------------------------------+
