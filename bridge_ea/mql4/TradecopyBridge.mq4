//+------------------------------------------------------------------+
//| TradecopyBridge.mq4 - tradecopy bridge EA for MetaTrader 4       |
//|                                                                  |
//| Attach to any one chart of the account's terminal.               |
//|                                                                  |
//|  * master side: MT4 reports no trade transactions, so the EA     |
//|    scans the trade pool on every tick and every InpTimerMs timer |
//|    event and diffs it against the previous scan (TcMt4Terminal). |
//|    The timer (EventSetMillisecondTimer) is what bounds detection |
//|    latency when no quotes arrive: 10-16 ms on Windows.           |
//|  * follower side: commands are read from the socket on the same |
//|    tick/timer and executed with OrderSend/OrderClose/OrderModify |
//|    /OrderCloseBy/OrderDelete, deviation as slippage.             |
//|  * TradecopyLoop.mq4 (a script) does the same in a tight loop    |
//|    with a 1 ms zmq_poll; while it runs it owns the connector     |
//|    socket and this EA only keeps its scan baseline, taking over  |
//|    again when the script stops (see CTcOwnerLock).               |
//+------------------------------------------------------------------+
#property copyright "tradecopy"
#property version   "1.00"
#property strict
#property description "tradecopy bridge: reports trades and executes copy commands over ZeroMQ."
#property description "Needs libzmq.dll (32-bit) in MQL4\\Libraries and 'Allow DLL imports'."

#include <Tradecopy\TcMt4Terminal.mqh>

//--- connection
input string       InpEndpoint         = "tcp://127.0.0.1:5555"; // Connector endpoint (ROUTER)
input string       InpToken            = "";                     // Token (sent in hello)
input string       InpServerKey        = "";                     // Connector's CURVE public key (Z85, 40 chars)
input string       InpPublicKey        = "";                     // This terminal's CURVE public key (Z85)
input string       InpSecretKey        = "";                     // This terminal's CURVE secret key (Z85)
input bool         InpPlaintext        = false;                  // Allow no encryption (trusted loopback only)
input string       InpAccountId        = "";                     // Account id ("" = account number)
input ENUM_TC_ROLE InpRole             = TC_ROLE_BOTH;           // Role
//--- execution
input int          InpMagic            = 0;                      // Magic for copies when the command has none
input int          InpDeviationPoints  = 20;                     // Slippage, points (when the command has none)
input bool         InpStopsAfterFill   = false;                  // Market-execution account: set SL/TP after the fill
input bool         InpDedupByComment   = true;                   // Never open a second copy with the same comment
input int          InpRecoverDays      = 7;                      // History searched for earlier copies (days)
//--- timing
input int          InpHeartbeatMs      = 1000;                   // Heartbeat until the connector's welcome sets it
input int          InpAccountMs        = 1000;                   // Account updates at most every (ms)
input int          InpTimerMs          = 10;                     // Timer (ms): scan + socket polling
input string       InpSymbols          = "";                     // Snapshot symbols ("" = Market Watch), comma separated

CTcMt4Terminal  g_term;
CTcBridge       g_bridge;
CTcOwnerLock    g_lock;
bool            g_ready = false;
int             g_login = 0;
string          g_account = "";
ulong           g_lastComment = 0;

bool ValidAccountId(const string id)
  {
   int n = StringLen(id);
   if(n < 1 || n > 64)
      return false;
   for(int i = 0; i < n; i++)
     {
      ushort c = StringGetCharacter(id, i);
      bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_' || c == '-';
      if(!ok)
         return false;
     }
   return true;
  }

//--- waits for the login: at terminal start OnInit can run before the account is known
bool Setup()
  {
   g_login = AccountNumber();
   if(g_login == 0)
      return false;
   g_account = StringLen(InpAccountId) > 0 ? InpAccountId : IntegerToString(g_login);
   TcRefreshServerOffset();
   g_term.Init(g_account, InpMagic, InpDeviationPoints, InpSymbols, InpRecoverDays, InpStopsAfterFill);
   g_lock.Init(IntegerToString(g_login), TC_KIND_EA);
   string none[];
   g_term.Scan(none, false);   // baseline: what is open now is described by the snapshot
   g_ready = true;
   PrintFormat("tradecopy: EA ready for account %s, role %s", g_account, EnumToString(InpRole));
   return true;
  }

void Pump()
  {
   if(!g_ready && !Setup())
      return;
   TcRefreshServerOffset();
   //--- ownership: the loop script asks for the socket; nobody alive -> take it
   if(g_lock.Held())
     {
      if(g_lock.HandoverRequested())
        {
         g_bridge.Stop();
         g_lock.Release();
         Print("tradecopy: TradecopyLoop took over the connector link");
        }
     }
   else
      if(g_lock.OwnerKind() == 0 && !g_lock.OtherWants() && g_lock.TryAcquire())
        {
         g_term.ReloadAliases();   // the loop script may have recorded partial closes meanwhile
         g_bridge.SetCurve(InpServerKey, InpPublicKey, InpSecretKey, InpPlaintext);
         g_bridge.Start(GetPointer(g_term), InpEndpoint, InpToken, g_account, InpRole, InpHeartbeatMs, InpAccountMs,
                        InpDedupByComment);
        }
   bool own = g_lock.Held();
   //--- scan always (keeps the baseline current); report only while we own the link
   string events[];
   ArrayResize(events, 0);
   g_term.Scan(events, own && TcRoleReports(InpRole));
   for(int i = 0; i < ArraySize(events); i++)
      g_bridge.EnqueueEvent(events[i]);
   if(own)
     {
      g_bridge.Service();
      g_lock.Beat();
     }
   ShowStatus(own);
  }

void ShowStatus(const bool own)
  {
   ulong now = TcNowMs();
   if(now - g_lastComment < 500)
      return;
   g_lastComment = now;
   if(own)
      Comment(g_bridge.Status());
   else
      Comment(StringFormat("tradecopy %s: %s owns the connector link", g_account,
                           g_lock.OwnerKind() == TC_KIND_SCRIPT ? "TradecopyLoop" : "another program"));
  }

int OnInit()
  {
   if(!MQLInfoInteger(MQL_DLLS_ALLOWED))
     {
      Alert("tradecopy: enable 'Allow DLL imports' for TradecopyBridge (libzmq.dll)");
      return INIT_FAILED;
     }
   if(StringLen(InpAccountId) > 0 && !ValidAccountId(InpAccountId))
     {
      Alert("tradecopy: account id may only contain letters, digits, '_' and '-' (1-64 characters)");
      return INIT_PARAMETERS_INCORRECT;
     }
   string curve = TcCurveInputsProblem(InpServerKey, InpPublicKey, InpSecretKey, InpPlaintext);
   if(curve != "")
     {
      Alert("tradecopy: " + curve);
      return INIT_PARAMETERS_INCORRECT;
     }
   g_ready = false;
   Setup();
   EventSetMillisecondTimer((int)MathMax(1, InpTimerMs));
   Pump();
   return INIT_SUCCEEDED;
  }

void OnDeinit(const int reason)
  {
   EventKillTimer();
   if(g_lock.Held())
     {
      g_bridge.Stop();
      g_lock.Release();
     }
   g_term.Shutdown();
   g_ready = false;
   Comment("");
  }

void OnTimer()
  {
   Pump();
  }

void OnTick()
  {
   Pump();
  }
//+------------------------------------------------------------------+
